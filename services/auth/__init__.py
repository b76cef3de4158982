"""Accounts, login, JWT access and refresh tokens, JWKS, MFA, sessions, parent links and the audit trail."""
