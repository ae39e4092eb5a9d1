"""Real-infrastructure harness for creditwatch's integration tests.

The integration suite must run against the real PostgreSQL and the real Apache Kafka
(see docs/architecture.md, "Brokers and databases"), and the machines it runs on have no
Docker. This package starts both as plain child processes: ``servers`` holds the process
management, ``plugin`` exposes it to pytest as session fixtures, and ``scripts/test-infra``
uses it to keep a pair of servers running across many pytest invocations.
"""
