"""WAN benchmark: emulated hospital sites and hub in network namespaces; raw path vs OpenVPN vs relay."""
