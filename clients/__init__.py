"""silofed.clients: the business-unit node.

Loads the BU's silo, validates it against its declared schema, applies consent and minimisation,
builds features, trains with DP-SGD (Opacus) and answers the coordinator through a Flower ClientApp.
"""
