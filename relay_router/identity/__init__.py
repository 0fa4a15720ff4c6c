"""Patient identity across institutions (issue 14): identifier domains, mapping sources, the resolver.

`model` holds the value types, `resolver` tries the configured mapping sources in order
(cross-reference table `xref`, IHE PIXm `pixm`, IHE PIX `pix`, the Other Patient IDs
Sequence `other_ids`) with a TTL cache and an audit record per lookup; `adt` listens for the
hospital's ADT feed (A40 merges). Coercion of data sets and DIMSE messages lives beside them.
"""
