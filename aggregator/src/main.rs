//! `its-aggregator` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use its_aggregator::config::RawConfig;
use its_aggregator::pki::Pki;

#[derive(Parser)]
#[command(
    name = "its-aggregator",
    version,
    about = "ITS Camera AI aggregator: exactly-once ingest of traffic events from the agent fleet"
)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded defaults apply; any value can be
    /// overridden with ITS_AGGREGATOR__SECTION__KEY=value.
    #[arg(long, short, global = true, env = "ITS_AGGREGATOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve {
        /// Write the bound addresses as JSON to this file once listening (for supervisors and tests).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate the configuration, print every problem, and exit.
    CheckConfig,
    /// The fleet certificate authority.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Device certificates.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// People who use the API.
    #[command(subcommand)]
    User(UserCommand),
    /// Token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The key ring that seals the secrets stored in the database.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// MQTT for third parties.
    #[command(subcommand)]
    Mqtt(MqttCommand),
    /// Run an aggregator and an agent on this machine and show events arriving.
    Demo {
        /// Working directory (default: a new directory under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seconds to run (0 = until Ctrl-C).
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Camera for the agent: an rtsp:// URL or a video file (repeat for several). Default:
        /// the bundled street clip, looped in real time.
        #[arg(long = "camera")]
        cameras: Vec<String>,
        /// Detector model manifest (default: the bundled SSD MobileNet v2).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Detector backend: auto, tract, onnxruntime or tensorrt.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Synthetic events per second on top of the cameras (0 = none), for load.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// HTTP API address (a free port is taken if it is in use).
        #[arg(long, default_value = "127.0.0.1:8470")]
        http: SocketAddr,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user. The password is asked for on the terminal (twice), or read from the first
    /// line of standard input with --password-stdin. There is no default password.
    Add {
        username: String,
        /// admin, operator, analyst, viewer, integrator or device.
        #[arg(long)]
        role: String,
        /// Read the password from standard input instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a new token signing key; the old one keeps verifying until its tokens expire.
    Rotate,
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Write a new key ring (one fresh key, mode 0600) to --out, or to the configured key file;
    /// an existing file is never overwritten. For deployments that pass the ring in
    /// ITS_AGGREGATOR_SECRETS_KEYRING (e.g. a Kubernetes Secret).
    Init {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Put a new key first in the key file and seal every stored secret again with it. Older
    /// keys stay in the file (replicas still running with the old file keep working) unless
    /// --retire-old is given.
    Rotate {
        /// Drop the older keys from the file once nothing is sealed with them.
        #[arg(long)]
        retire_old: bool,
    },
}

#[derive(Subcommand)]
enum MqttCommand {
    /// Write a Mosquitto password file (`passwd`, PBKDF2-SHA512 `$7$` hashes) and ACL file
    /// (`acl`) for an external broker from the stored integrator credentials (and the
    /// aggregator's own `[mqtt] username`/`password`). Run it again after every change.
    MosquittoConfig {
        /// Directory to write `passwd` and `acl` into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the CA, the server certificate and an empty revocation list.
    Init {
        /// Extra DNS names or IP addresses for the server certificate (agents connect by these).
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Issue a certificate for a device and write its bundle (device.pem, device.key, ca.pem).
    Enroll {
        device_id: String,
        /// Output directory for the bundle (default: ./<device-id>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Revoke every certificate of a device; a running aggregator refuses it within a second.
    Revoke { device_id: String },
    /// List issued certificates.
    List,
}

/// The validated configuration, or (every problem printed) exit code 2 from the calling function.
macro_rules! valid_config {
    ($raw:expr, $source:expr) => {
        match $raw.validate(&$source) {
            Ok(c) => c,
            Err(e) => {
                eprint!("{e}");
                return Ok(ExitCode::from(2));
            }
        }
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own narrative; only problems are logged unless RUST_LOG says otherwise.
    // The demo prints its own story; the embedded broker's internals (its front's readiness probe,
    // the disconnect at the aggregator's restart) would only clutter it.
    let default_filter = if matches!(cli.command, Some(Command::Demo { .. })) { "warn,rumqttd=off" } else { "info" };
    its_hostio::logging::init_stderr_logging(default_filter);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let source = cli.config.as_ref().map_or("<defaults>".to_string(), |p| p.display().to_string());
    let raw = match RawConfig::load(cli.config.as_deref(), std::env::vars()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let pki = Pki::new(&raw.pki_dir);
    match cli.command.unwrap_or(Command::Serve { ready_file: None }) {
        Command::Pki(PkiCommand::Init { names }) => {
            pki.init(&names)?;
            println!("CA, server certificate and CRL written to {}", pki.dir().display());
        }
        Command::Device(DeviceCommand::Enroll { device_id, out, days }) => {
            let out = out.unwrap_or_else(|| PathBuf::from(&device_id));
            let bundle = pki.enroll(&device_id, &out, days)?;
            println!("device {device_id}: bundle written to {}", bundle.dir.display());
            println!("copy it to the box as /etc/its-agent/device (device.key is secret; mode 0600)");
        }
        Command::Device(DeviceCommand::Revoke { device_id }) => {
            let n = pki.revoke(&device_id)?;
            println!("revoked {n} certificate(s) of {device_id}; CRL updated at {}", pki.crl_path().display());
        }
        Command::Device(DeviceCommand::List) => {
            for c in pki.issued()? {
                let state = c.revoked_at.as_deref().map_or("valid".to_string(), |t| format!("revoked {t}"));
                println!("{}\t{}\tuntil {}\t{state}", c.device_id, c.serial_hex, c.not_after);
            }
        }
        Command::User(cmd) => {
            let cfg = valid_config!(raw, source);
            return runtime()?.block_on(user_command(cmd, &cfg));
        }
        Command::Secrets(SecretsCommand::Init { out }) => {
            let cfg = valid_config!(raw, source);
            let path = match out {
                Some(p) => p,
                None => match cfg.secrets_source() {
                    its_aggregator::vault::KeySource::File(p) => p,
                    its_aggregator::vault::KeySource::Env(_) => {
                        anyhow::bail!("the key ring comes from the environment; give --out FILE")
                    }
                },
            };
            if path.exists() {
                anyhow::bail!("{} exists: not overwritten", path.display());
            }
            let ring = its_aggregator::vault::Vault::ephemeral();
            ring.write_file(&path)?;
            println!("key ring {} written to {} (mode 0600)", ring.active_key_id().unwrap_or_default(), path.display());
        }
        Command::Secrets(SecretsCommand::Rotate { retire_old }) => {
            let cfg = valid_config!(raw, source);
            runtime()?.block_on(rotate_secrets(&cfg, retire_old))?;
        }
        Command::Keys(KeysCommand::Rotate) => {
            let cfg = valid_config!(raw, source);
            runtime()?.block_on(async {
                let store =
                    its_aggregator::store::open_store_with_secrets(&cfg.database_url, &cfg.secrets_source()).await?;
                let auth = its_aggregator::auth::AuthService::open(store.db(), cfg.auth.clone()).await?;
                let kid = auth.keys.rotate(its_aggregator::unix_ms()).await?;
                auth.audit_quiet(
                    its_aggregator::auth::store::AuditEntry {
                        actor: "cli".into(),
                        action: "keys.rotated",
                        target: Some(kid.clone()),
                        outcome: "success",
                        ..Default::default()
                    },
                    its_aggregator::unix_ms(),
                )
                .await;
                println!("new signing key {kid}; running aggregators pick it up within 30 s");
                anyhow::Ok(())
            })?;
        }
        Command::Mqtt(MqttCommand::MosquittoConfig { out }) => {
            let cfg = valid_config!(raw, source);
            let n = runtime()?.block_on(async {
                let store =
                    its_aggregator::store::open_store_with_secrets(&cfg.database_url, &cfg.secrets_source()).await?;
                its_aggregator::mqtt::credentials::write_mosquitto_config(store.db(), &cfg.mqtt.mode, &out).await
            })?;
            println!("{n} integrator credential(s): wrote {0}/passwd and {0}/acl", out.display());
        }
        Command::CheckConfig => match raw.validate(&source) {
            Ok(_) => println!("{source}: configuration is valid"),
            Err(e) => {
                eprint!("{e}");
                return Ok(ExitCode::from(2));
            }
        },
        Command::Demo { dir, duration, cameras, model, backend, rate, http } => {
            let rt = runtime()?;
            rt.block_on(async {
                let metrics = its_aggregator::server::install_metrics()?;
                let opts = its_aggregator::demo::DemoOptions {
                    dir,
                    duration: Duration::from_secs(duration),
                    rate_per_s: rate,
                    cameras,
                    model,
                    backend,
                    http,
                };
                its_aggregator::demo::run_demo(opts, metrics).await
            })?;
        }
        Command::Serve { ready_file } => {
            let cfg = valid_config!(raw, source);
            let rt = runtime()?;
            rt.block_on(async {
                let metrics = its_aggregator::server::install_metrics()?;
                let (tx, rx) = tokio::sync::watch::channel(false);
                let server = its_aggregator::server::Server::start(&cfg, metrics, ready_file, rx).await?;
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutting down");
                    let _ = tx.send(true);
                });
                server.wait().await
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `its-aggregator secrets rotate`.
async fn rotate_secrets(cfg: &its_aggregator::config::ServerConfig, retire_old: bool) -> anyhow::Result<()> {
    use its_aggregator::vault::{KEYRING_ENV, KeySource, Vault};
    let KeySource::File(path) = cfg.secrets_source() else {
        anyhow::bail!(
            "the key ring comes from ${KEYRING_ENV}: put a new key line (`<id> <32 bytes base64>`) first in it, \
             restart, then remove the old line once `its-aggregator secrets rotate` would find nothing to do"
        );
    };
    // Opening seals whatever is not sealed with the current active key yet.
    let store = its_aggregator::store::open_store_with_secrets(&cfg.database_url, &cfg.secrets_source())
        .await
        .context("opening the database")?;
    drop(store);
    let (current, _) = Vault::load(&KeySource::File(path.clone()), false)?;
    let next = current.with_new_active_key();
    next.write_file(&path)?;
    let store = its_aggregator::store::open_store(&cfg.database_url, next.clone()).await?;
    let report = its_aggregator::store::sealed::seal_all(&store.db()).await?;
    let active = next.active_key_id().unwrap_or_default().to_owned();
    println!("new active key {active}: {} secret(s) sealed again with it", report.plain + report.resealed);
    if retire_old {
        let in_use = its_aggregator::store::sealed::key_ids_in_use(&store.db()).await?;
        if in_use.iter().all(|k| *k == active) {
            next.active_only().write_file(&path)?;
            println!("older keys removed from {}", path.display());
        } else {
            anyhow::bail!("secrets are still sealed with {in_use:?}: older keys kept");
        }
    } else {
        println!(
            "older keys kept in {} (replicas still on the old file keep working); drop them with --retire-old",
            path.display()
        );
    }
    Ok(())
}

async fn user_command(cmd: UserCommand, cfg: &its_aggregator::config::ServerConfig) -> anyhow::Result<ExitCode> {
    use its_aggregator::auth::{AuthError, AuthService, Role};
    let store = its_aggregator::store::open_store_with_secrets(&cfg.database_url, &cfg.secrets_source())
        .await
        .with_context(|| format!("opening {}", its_aggregator::server::redact(&cfg.database_url)))?;
    let auth = AuthService::open(store.db(), cfg.auth.clone()).await?;
    match cmd {
        UserCommand::Add { username, role, password_stdin } => {
            let Some(role) = Role::parse(&role) else {
                eprintln!("error: unknown role {role:?}; use admin, operator, analyst, viewer, integrator or device");
                return Ok(ExitCode::from(2));
            };
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
                line.trim_end_matches(['\n', '\r']).to_owned()
            } else {
                let first =
                    rpassword::prompt_password(format!("password for {username}: ")).context("reading the password")?;
                let again = rpassword::prompt_password("again: ").context("reading the password")?;
                if first != again {
                    eprintln!("error: the passwords differ");
                    return Ok(ExitCode::from(2));
                }
                first
            };
            match auth.create_user(&username, &password, role, &its_aggregator::store::Scope::All).await {
                Ok(id) => {
                    auth.audit_quiet(
                        its_aggregator::auth::store::AuditEntry {
                            actor: "cli".into(),
                            action: "user.created",
                            target: Some(format!("user:{}", its_aggregator::auth::normalise_username(&username))),
                            outcome: "success",
                            detail: serde_json::json!({ "role": role }),
                            ..Default::default()
                        },
                        its_aggregator::unix_ms(),
                    )
                    .await;
                    println!(
                        "user {} created (id {id}, role {role})",
                        its_aggregator::auth::normalise_username(&username)
                    );
                }
                Err(AuthError::Invalid(msg)) => {
                    eprintln!("error: {msg}");
                    return Ok(ExitCode::from(2));
                }
                Err(AuthError::Store(its_aggregator::store::StoreError::Conflict(msg))) => {
                    eprintln!("error: {msg}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        UserCommand::List => {
            for u in auth.store.list_users().await? {
                let state = if u.disabled { "disabled" } else { "active" };
                let mfa = if u.totp_enabled { "mfa" } else { "no-mfa" };
                println!("{}\t{}\t{}\t{state}\t{mfa}", u.user_id, u.username, u.role);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
