"""The driver: validates a config, connects to Ray, runs the stages in order and skips finished work."""
