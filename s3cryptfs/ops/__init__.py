"""Volume-wide key operations run from the command line: descriptor updates, rewrap, migrate."""
