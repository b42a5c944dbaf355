"""The node-local checkpoint tier: local steps, their replicas on peer nodes, and restart from them.

Data plane (``layout``, ``peer``, ``storage``): where a node keeps its local
steps, the authenticated peer service every rank runs, and the two storages a
local save and a tiered restore go through. See docs/architecture.md,
"Node-local tier".
"""
