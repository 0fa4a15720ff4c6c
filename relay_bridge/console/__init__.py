"""The bridge's read-only web console (docs/operations.md, "Web console").

admins: the admin accounts (scrypt hashes in their own file) and `relay-bridge admin ...`;
auth: the signed session cookie and the login throttle;
events: a bounded ring of the refusals and security alerts the bridge audited;
view: what a page shows, built from BridgeState; app: the aiohttp application and its server.
"""
