"""The web consoles in a real browser: headless Chromium (Debian's chromium and chromium-driver) via Selenium.

A real bridge and two real routers run as processes; the test signs in through the bridge console's form
and asserts what a person sees: both sites up, a running C-STORE whose byte count grows between two of
the page's own refreshes, a site that stops shows offline within 5 s (no reload by the test: the page
refreshes itself), and on the router console its devices and a recent error linking to its
troubleshooting entry. Set RELAY_SCREENSHOTS=1 to refresh the screenshots in docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from relay_demo.archive import DemoArchive
from relay_demo.datasets import generate_ct_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
ADMIN, PASSWORD = "ops", "console password 1"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# HTML in a description: the bridge accepts it (printable, no control characters or Rich brackets since
# the second security round), so the console must show it as text. Control characters never reach the
# page now (refused at sign-on); their escaping is unit-tested (tests/unit/console).
HOSTILE = "<b>bold</b><script>document.title = 'pwned'</script>"


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e .[test])")
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} (Debian: apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"CI requires the browser; {message}", pytrace=False)
    pytest.skip(message)


class SlowArchive(DemoArchive):
    """An archive that takes its time with each image, so that a transfer runs for several seconds."""

    delay_s = 0.4

    def _on_store(self, event: evt.Event) -> int:
        time.sleep(self.delay_s)
        return super()._on_store(event)


@pytest.fixture
def browser() -> Iterator[object]:
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def ready_facts(net: LocalRelayNetwork, name: str) -> dict[str, int]:
    return json.loads((net.workdir / f"{name}.ready").read_text())


@pytest.fixture
def console_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRelayNetwork, SlowArchive]]:
    """A bridge with its console and an admin, two routers with theirs; site-b shares a slow archive."""
    net = LocalRelayNetwork(tmp_path_factory.mktemp("console")).start(bridge=False)
    with (net.workdir / "bridge.toml").open("a") as out:
        out.write('\n[metrics]\nlisten = ""\n\n[console]\nlisten = "127.0.0.1:0"\n')
    added = net.bridge_admin("admin", "add", ADMIN, stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    net.start_bridge()
    archive = SlowArchive("ARCHIVE_B", 0, tmp_path_factory.mktemp("archive-b")).start()
    try:
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])], start=False)
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], start=False)
        for site in ("site-b", "site-a"):
            with net.router_config_path(site).open("a") as out:
                out.write('\n[metrics]\nlisten = ""\n\n[console]\nlisten = "127.0.0.1:0"\n')
                if site == "site-b":  # a description that tries markup, a script and a terminal escape
                    out.write(f'\n[[shared]]\nae_title = "OTHER_B"\nhost = "{HOST}"\nport = {archive.port}\n')
                    out.write(f'share_with = ["site-a"]\ndescription = {json.dumps(HOSTILE)}\n')
            net.start_router(site)
        net.wait_connected()
        yield net, archive
    finally:
        net.stop()
        archive.stop()


def screenshot(driver: object, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("RELAY_SCREENSHOTS"):
        shutil.copyfile(path, SCREENSHOTS / name)


def megabytes(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+) (B|KB|MB|GB)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


def send_series(port: int, datasets: list[Dataset], results: list[object]) -> None:
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE_B")
    try:
        assert assoc.is_established
        for ds in datasets:
            results.append(assoc.send_c_store(ds).Status)
    finally:
        if assoc.is_established:
            assoc.release()


def wait_for(driver: object, condition: Callable[[object], object], timeout: float, what: str) -> object:
    """Poll `condition`; an element that a refresh replaced mid-read is simply read again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (StaleElementReferenceException, NoSuchElementException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(condition, message=what)


def text(driver: object, selector: str) -> str:
    """The visible text of the element `selector` (CSS), read whole from one rendering of the page."""
    from selenium.webdriver.common.by import By

    return str(wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector).text, 5, selector))


def test_a_person_watches_the_network_in_the_consoles(
    console_net: tuple[LocalRelayNetwork, SlowArchive], browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    net, archive = console_net
    driver = browser
    bridge_url = f"http://{HOST}:{ready_facts(net, 'bridge')['console_port']}/"
    router_url = f"http://{HOST}:{ready_facts(net, 'router-site-a')['console_port']}/"

    # Not signed in: the sign-in form; a wrong password is refused with a clear message.
    driver.get(bridge_url)  # type: ignore[attr-defined]
    assert driver.current_url.endswith("/login")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "name").send_keys(ADMIN)  # type: ignore[attr-defined]
    driver.find_element(By.ID, "password").send_keys("not the password")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "sign-in").click()  # type: ignore[attr-defined]
    assert text(driver, "#login-error") == "Wrong account name or password."
    driver.find_element(By.ID, "name").send_keys(ADMIN)  # type: ignore[attr-defined]
    driver.find_element(By.ID, "password").send_keys(PASSWORD)  # type: ignore[attr-defined]
    driver.find_element(By.ID, "sign-in").click()  # type: ignore[attr-defined]

    def site_state(name: str) -> str:
        return text(driver, f"#site-{name} .state")

    wait_for(driver, lambda d: "2 of 2 sites signed on" in d.find_element(By.ID, "summary").text, 10, "both sites")
    assert site_state("site-a").startswith("up since ") and " UTC (" in site_state("site-a")
    assert site_state("site-b").startswith("up since ")
    links = text(driver, "#links")
    assert "site-a → site-b ARCHIVE_B, OTHER_B up" in links
    # The hostile description is shown as the text it is: no markup, no script run.
    shares = text(driver, "#site-site-b")
    assert "<b>bold</b><script>document.title = 'pwned'</script>" in shares
    assert not driver.find_elements(By.CSS_SELECTOR, "#sites b, #sites script")  # type: ignore[attr-defined]
    assert driver.title == "dicom-relay bridge"  # type: ignore[attr-defined]

    # A transfer through the relay: its bytes grow from one automatic refresh to the next.
    datasets = generate_ct_series(14, rows=512, cols=512)  # ~0.5 MB each, 0.4 s each at the archive
    results: list[object] = []
    sender = threading.Thread(target=send_series, args=(net.sites["site-a"].port, datasets, results))
    sender.start()
    try:
        row = "#active tr.association .bytes"
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, row), 10, "the association appears")
        first_mb = megabytes(text(driver, row))
        second_mb = float(
            wait_for(
                driver,
                lambda d: (
                    (m := [megabytes(e.text) for e in d.find_elements(By.CSS_SELECTOR, row)])
                    and m[0] > first_mb
                    and m[0]
                ),
                5,
                "the bytes grow",
            )
        )
        assert second_mb > first_mb
        active = text(driver, "#active")
        assert "site-a → site-b" in active and "WS_A → ARCHIVE_B" in active and "relaying" in active
        screenshot(driver, "bridge-console.png", tmp_path)

        # The router console at site-a: its devices, the same association running.
        driver.get(router_url)  # type: ignore[attr-defined]
        remote = text(driver, "#remote-ARCHIVE_B")
        assert "site-b" in remote and "online" in remote
        assert "signed on to the bridge" in text(driver, "#link")
    finally:
        sender.join(60)
    assert results == [0] * len(datasets)
    assert len(archive.instances) == len(datasets)

    # site-b stops: the bridge page (refreshing itself, the test does not reload) shows it offline within 5 s.
    driver.get(bridge_url)  # type: ignore[attr-defined]
    net.stop_router("site-b")
    stopped = time.monotonic()
    wait_for(driver, lambda d: site_state("site-b").startswith("offline since "), 5, "site-b offline within 5 s")
    assert time.monotonic() - stopped < 5
    assert site_state("site-a").startswith("up since ")
    assert "site-b offline" in text(driver, "#links")
    finished = text(driver, "#finished")
    assert "WS_A → ARCHIVE_B relayed" in finished

    # At site-a, a device calls the offline archive: the router console lists the error and where to read.
    ae = AE(ae_title="WS_A")
    ae.add_requested_context(Verification)
    assert not ae.associate(HOST, net.sites["site-a"].port, ae_title="ARCHIVE_B").is_established
    driver.get(router_url)  # type: ignore[attr-defined]
    wait_for(driver, lambda d: "offline" in d.find_element(By.ID, "remote-ARCHIVE_B").text, 5, "ARCHIVE_B offline")
    errors = text(driver, "#errors")
    assert "site_offline" in errors and "WS_A → ARCHIVE_B" in errors
    screenshot(driver, "router-console.png", tmp_path)
    wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#errors a.help").click() or True, 5, "follow the link")
    assert driver.current_url.endswith("/help#association-rejected")  # type: ignore[attr-defined]
    section = text(driver, "#association-rejected")
    assert "Association rejected" in section and "site_offline" in section
    assert "docs/operations.md#association-rejected" in section
