"""Bridge replicas behind one address (issue 12): registration, presence and cross-replica forwarding.

- `pki`: the cluster CA and the one certificate every replica presents (`relay-bridge cluster-cert`).
- `presence`: the replica's own leased row and one leased row per control stream it holds.
- `forward`: the internal gRPC service (`relay.cluster.v1.Cluster/Forward`) an association takes
  when its destination router is held by another replica, and the client side that opens it.
- `node`: the pieces wired together for `relay_bridge.server`.
"""
