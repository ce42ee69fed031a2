"""The world flowcopy acts on: the ESS array, the VMware farm, and the one interface to them.

Nothing in this package imports the engine.
"""
