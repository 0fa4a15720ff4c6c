#!/bin/sh
# Install the dicom-relay systemd services (see docs/operations.md, "Install as a service").
#
#   deploy/install.sh [--root DIR] [--prefix DIR] [--enable] [--package SPEC | --wheelhouse DIR] router|bridge ...
#
# What it does, each step idempotent (run it again after `relay-bridge init` or an upgrade):
#   - with --package or --wheelhouse: installs (or upgrades) dicom-relay into the Python environment
#     PREFIX (created with python3 -m venv if missing), dependencies pinned by constraints.txt;
#   - creates the system user and group dicom-relay (systemd-sysusers; useradd as a fallback);
#   - creates /etc/dicom-relay (root:dicom-relay, 0750) and /var/lib/dicom-relay (dicom-relay, 0750);
#   - installs relay-router.service / relay-bridge.service into /etc/systemd/system (0644);
#   - installs a starting router.toml / bridge.toml unless one exists (root:dicom-relay, 0640);
#   - router: creates /etc/dicom-relay/router.env for RELAY_ROUTER_PASSWORD (root:root, 0600);
#   - tightens what is already in /etc/dicom-relay: keys and password files 0640 root:dicom-relay,
#     router.env 0600 root:root; warns about ca.key (keep it off service hosts);
#   - gives back to dicom-relay any file below /var/lib/dicom-relay that another user owns (left by
#     a command run as root with an older version);
#   - on the live system (no --root): systemctl daemon-reload, and `enable` with --enable.
#
# --root DIR    install below DIR instead of / (staging, images, tests); no systemctl.
# --prefix DIR  the Python environment holding relay-router and relay-bridge (default /opt/dicom-relay);
#               ExecStart lines are rewritten to DIR/bin when it differs.
# --enable      systemctl enable the installed services (live system only; start them yourself).
# --package SPEC    install SPEC (a dicom-relay wheel file, a source directory) from the package index,
#                   pinned by requirements/constraints.txt of this checkout.
# --wheelhouse DIR  install offline (pip --no-index --find-links DIR) from a directory made by
#                   `make wheelhouse`: dicom-relay's wheel, its dependencies' wheels and constraints.txt.
#                   With --root, the environment is built in DIR/PREFIX (to test or stage it).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=""
PREFIX=/opt/dicom-relay
ENABLE=0
ROLES=""
USER_NAME=dicom-relay
PACKAGE=""
WHEELHOUSE=""
PYTHON=${PYTHON:-python3}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=${2%/}; shift 2 ;;
        --root=*) ROOT=${1#--root=}; ROOT=${ROOT%/}; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=${2%/}; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; PREFIX=${PREFIX%/}; shift ;;
        --enable) ENABLE=1; shift ;;
        --package) [ $# -ge 2 ] || die "--package needs a wheel file or a directory"; PACKAGE=$2; shift 2 ;;
        --package=*) PACKAGE=${1#--package=}; shift ;;
        --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse needs a directory"; WHEELHOUSE=${2%/}; shift 2 ;;
        --wheelhouse=*) WHEELHOUSE=${1#--wheelhouse=}; WHEELHOUSE=${WHEELHOUSE%/}; shift ;;
        router|bridge) ROLES="$ROLES $1"; shift ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done
[ -n "$ROLES" ] || die "name what to install: router, bridge, or both"
[ -z "$PACKAGE" ] || [ -z "$WHEELHOUSE" ] || die "give --package or --wheelhouse, not both"
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE is not a directory"
    ls "$WHEELHOUSE"/dicom_relay-*.whl >/dev/null 2>&1 || die "no dicom_relay-*.whl in $WHEELHOUSE (make it with: make wheelhouse)"
fi
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != "/" ] || ROOT=""
fi

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1

# -- the Python environment (the release, pinned) ------------------------------------------
if [ -n "$PACKAGE$WHEELHOUSE" ]; then
    VENV="$ROOT$PREFIX"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV" || die "cannot create $VENV (Debian: apt-get install python3-venv)"
        say "created the Python environment $VENV"
    fi
    if [ -n "$WHEELHOUSE" ]; then
        constraints="$WHEELHOUSE/constraints.txt"
        [ -f "$constraints" ] || constraints="$HERE/../requirements/constraints.txt"
        # Offline: nothing but the wheelhouse, exactly the pinned versions.
        "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" -c "$constraints" \
            --upgrade dicom-relay || die "installing from $WHEELHOUSE failed"
    else
        constraints="$HERE/../requirements/constraints.txt"
        [ -f "$constraints" ] || die "$constraints is missing (run install.sh from a dicom-relay checkout)"
        "$VENV/bin/python" -m pip install --quiet -c "$constraints" --upgrade "$PACKAGE" ||
            die "installing $PACKAGE failed"
    fi
    say "installed $("$VENV/bin/relay-bridge" --version) into $VENV"
fi

# -- the system user ------------------------------------------------------------------
mkdir -p "$ROOT/etc/sysusers.d"
install -m 0644 "$HERE/systemd/dicom-relay.sysusers" "$ROOT/etc/sysusers.d/dicom-relay.conf"
if command -v systemd-sysusers >/dev/null 2>&1; then
    if [ -n "$ROOT" ]; then
        systemd-sysusers --root="$ROOT" "$ROOT/etc/sysusers.d/dicom-relay.conf"
    else
        systemd-sysusers "$ROOT/etc/sysusers.d/dicom-relay.conf"
    fi
elif [ -z "$ROOT" ]; then
    getent passwd "$USER_NAME" >/dev/null 2>&1 ||
        useradd --system --user-group --home-dir /var/lib/dicom-relay --shell /usr/sbin/nologin "$USER_NAME"
else
    die "--root needs systemd-sysusers to create the user inside $ROOT"
fi
ids=$(awk -F: -v u="$USER_NAME" '$1 == u { print $3 ":" $4 }' "$ROOT/etc/passwd")
[ -n "$ids" ] || die "user $USER_NAME missing from $ROOT/etc/passwd"
UID_N=${ids%%:*}
GID_N=${ids##*:}
say "user $USER_NAME is uid $UID_N, gid $GID_N"

# own OWNER:GROUP MODE PATH: ownership needs root; modes are always set.
own() {
    if [ "$IS_ROOT" = 1 ]; then chown "$1" "$3"; fi
    chmod "$2" "$3"
}
[ "$IS_ROOT" = 1 ] || say "not running as root: modes are set, ownership is left as it is"

# -- directories ----------------------------------------------------------------------
mkdir -p "$ROOT/etc/dicom-relay" "$ROOT/var/lib/dicom-relay" "$ROOT/etc/systemd/system"
own "0:$GID_N" 0750 "$ROOT/etc/dicom-relay"
own "$UID_N:$GID_N" 0750 "$ROOT/var/lib/dicom-relay"

# -- units and configuration ----------------------------------------------------------
for role in $ROLES; do
    unit="$ROOT/etc/systemd/system/relay-$role.service"
    sed "s#/opt/dicom-relay/bin/#$PREFIX/bin/#g" "$HERE/systemd/relay-$role.service" > "$unit.tmp"
    mv "$unit.tmp" "$unit"
    own 0:0 0644 "$unit"
    say "installed $unit"
    config="$ROOT/etc/dicom-relay/$role.toml"
    if [ -e "$config" ]; then
        say "kept the existing $config"
    else
        cp "$HERE/systemd/$role.toml" "$config"
        say "installed a starting $config: edit it (deploy/$role.example.toml lists every key)"
    fi
    own "0:$GID_N" 0640 "$config"
    [ -x "$PREFIX/bin/relay-$role" ] || [ -n "$ROOT" ] ||
        say "warning: $PREFIX/bin/relay-$role is missing: run install.sh again with --package or --wheelhouse"
done

case " $ROLES " in
    *" router "*)
        envfile="$ROOT/etc/dicom-relay/router.env"
        if [ ! -e "$envfile" ]; then
            (umask 077 && cat > "$envfile" <<'ENV'
# Read by systemd (as root) for relay-router.service. Put the password that
# `relay-bridge router add` printed after the = sign. Keep this file 0600 root:root.
RELAY_ROUTER_PASSWORD=
ENV
            )
            say "created $envfile: put the bridge password in it"
        fi
        own 0:0 0600 "$envfile"
        ;;
esac

# -- tighten secrets that are already there -------------------------------------------
for secret in "$ROOT"/etc/dicom-relay/*.key "$ROOT"/etc/dicom-relay/*password*; do
    [ -f "$secret" ] || continue
    case "$(basename "$secret")" in
        ca.key) say "warning: $secret is the CA's private key: keep it off this host once certificates are issued"
                own 0:0 0600 "$secret" ;;
        *) own "0:$GID_N" 0640 "$secret" ;;
    esac
done

# -- state files left by root (a command run as root by an older version) --------------
# The service must own everything below its state directory, or it cannot open its database or keys.
if [ "$IS_ROOT" = 1 ]; then
    find "$ROOT/var/lib/dicom-relay" -xdev ! -user "$UID_N" -print | while IFS= read -r stray; do
        chown -h "$UID_N:$GID_N" "$stray"
        say "gave $stray back to $USER_NAME (it belonged to another user)"
    done
fi

# -- the live system -------------------------------------------------------------------
if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    for role in $ROLES; do
        if [ "$ENABLE" = 1 ]; then systemctl enable "relay-$role.service"; fi
    done
    say "next: edit /etc/dicom-relay/*.toml, then: systemctl start relay-<role>; relay-<role> -c /etc/dicom-relay/<role>.toml status"
elif [ -z "$ROOT" ]; then
    say "systemd is not running here: units installed, nothing reloaded or enabled"
fi
say "done"
