"""The router's frame layer, sans-IO: flags (`flags`), feature agreement (`features`), the codec (`codec`).

Kept free of imports here so that `relay_router.seal`, `pace` and `compress` can take their
flag bits from `relay_router.wire.flags` while `codec` builds on them.
"""
