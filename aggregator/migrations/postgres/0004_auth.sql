-- Users: people who sign in. Usernames are stored lower-cased; passwords as argon2id PHC strings.
-- `scope` is the JSON form of a Scope (sites and cameras a viewer or integrator may see).
CREATE TABLE users (
    user_id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username               TEXT   NOT NULL UNIQUE,
    password_hash          TEXT   NOT NULL,
    role                   TEXT   NOT NULL,
    scope                  TEXT   NOT NULL DEFAULT '{"type":"all"}',
    disabled               BIGINT NOT NULL DEFAULT 0,
    totp_secret            TEXT,              -- base32; set when enrolment starts
    totp_enabled           BIGINT NOT NULL DEFAULT 0,
    totp_last_step         BIGINT NOT NULL DEFAULT 0, -- highest TOTP time step accepted (replay refusal)
    created_at_ms          BIGINT NOT NULL,
    updated_at_ms          BIGINT NOT NULL
);

-- One-time MFA recovery codes (SHA-256 of the code).
CREATE TABLE recovery_codes (
    user_id    BIGINT NOT NULL,
    code_hash  TEXT   NOT NULL,
    used_at_ms BIGINT,
    PRIMARY KEY (user_id, code_hash)
);

-- A session is one refresh-token family: born at login, revoked at logout, on reuse of a
-- rotated refresh token, or when the user's role, grants, password or MFA change.
CREATE TABLE sessions (
    session_id     TEXT   PRIMARY KEY,
    user_id        BIGINT NOT NULL,
    amr            TEXT   NOT NULL,          -- how the user authenticated: pwd or pwd+otp
    created_at_ms  BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT,
    revoked_reason TEXT,
    client_addr    TEXT
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_revoked ON sessions (revoked_at_ms);

-- Refresh tokens (SHA-256 of the token). A used token stays, so that its reuse is recognised.
CREATE TABLE refresh_tokens (
    token_hash    TEXT   PRIMARY KEY,
    session_id    TEXT   NOT NULL,
    issued_at_ms  BIGINT NOT NULL,
    used_at_ms    BIGINT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- RS256 signing keys. The newest unretired key signs; retired keys verify until their last
-- tokens have expired, and are published in the JWKS until then.
CREATE TABLE signing_keys (
    kid           TEXT   PRIMARY KEY,
    private_pem   TEXT   NOT NULL,
    n             TEXT   NOT NULL,   -- base64url modulus
    e             TEXT   NOT NULL,   -- base64url exponent
    created_at_ms BIGINT NOT NULL,
    retired_at_ms BIGINT
);

-- API keys for integrations: `its_<key_id>_<secret>`; only SHA-256 of the secret is stored.
CREATE TABLE api_keys (
    key_id        TEXT   PRIMARY KEY,
    name          TEXT   NOT NULL,
    secret_hash   TEXT   NOT NULL,
    permissions   TEXT   NOT NULL,   -- JSON array of permission names
    scope         TEXT   NOT NULL,   -- JSON Scope
    created_by    TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    last_used_ms  BIGINT,
    revoked_at_ms BIGINT
);

-- Per-role policy set by admins.
CREATE TABLE role_policies (
    role          TEXT   PRIMARY KEY,
    require_mfa   BIGINT NOT NULL DEFAULT 0,
    updated_at_ms BIGINT NOT NULL
);

-- Failed sign-in attempts per account name and per client address.
CREATE TABLE login_throttle (
    throttle_key    TEXT   PRIMARY KEY,   -- user:<name> or addr:<ip>
    failures        BIGINT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    locked_until_ms BIGINT
);

-- Security-relevant actions.
CREATE TABLE audit_log (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms   BIGINT NOT NULL,
    actor   TEXT   NOT NULL,      -- user:<name>, apikey:<id>, cli, system or anonymous
    action  TEXT   NOT NULL,      -- login.success, login.failure, user.role_changed, apikey.created, ...
    target  TEXT,
    outcome TEXT   NOT NULL,      -- success | failure | denied
    client_addr TEXT,
    detail  TEXT   NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_time ON audit_log (at_ms, id);
CREATE INDEX audit_log_actor ON audit_log (actor, at_ms);
CREATE INDEX audit_log_action ON audit_log (action, at_ms);
