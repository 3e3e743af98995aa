"""The HTTP plumbing both servers and every client share."""
