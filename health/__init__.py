"""Negotiate health checks and the monitor that feeds their results to the balancer."""
