"""Code shared by coordinator and sites: tasks, models, statistics, phantom, configuration."""
