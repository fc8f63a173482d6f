"""The only modules that reach the network (the Hub, package indexes)."""
