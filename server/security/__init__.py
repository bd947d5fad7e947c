"""Security: TLS (tls), identities and permissions (auth), the audit log (audit)."""
