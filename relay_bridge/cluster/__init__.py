"""Bridge replicas behind one address (issue 12): registration, presence and cross-replica forwarding.

- `pki`: the cluster CA and the one certificate every replica presents (`relay-bridge cluster-cert`).
- `presence`: the replica's own leased row and one leased row per control stream it holds.
- `forward`: an association whose destination router is held by another replica, both sides; the
  internal gRPC service (`relay.cluster.v1.Cluster/Forward`, `Evict`, `Link`).
- `link`, `link_codec`: the replica link such an association takes (one warm mutual-TLS
  connection, length-prefixed frames), the Forward call being the fallback.
- `node`: the pieces wired together for `relay_bridge.server`.
"""
