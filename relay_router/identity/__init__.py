"""Patient identity across institutions (issue 14): identifier domains, mapping sources, coercion.

See docs/patient-identity.md. The routers are the ends of the encryption, so only they
read and rewrite patient identifiers; the bridge never sees them.
"""
