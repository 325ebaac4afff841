//! The `outpost` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use outpost::config::Config;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "IoT edge gateway: local MQTT broker, upstream bridges, device provisioning, smart plugs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (on the built-in default config unless --config is given).
    Run {
        /// YAML config file; re-read on SIGHUP.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Override gateway.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Check a config file: exit 0 if valid, else print file, line, key and reason.
    CheckConfig { file: PathBuf },
    /// Show the gateway's clients and each bridge's link state and queue.
    Status {
        /// The config the gateway runs with (to find its data_dir).
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage devices: their e2e keys and MQTT logins (the running gateway follows the keystore).
    Devices {
        #[command(subcommand)]
        action: DeviceAction,
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Show the smart plugs the running gateway found: where, model, last reading, errors.
    Plugs {
        #[command(subcommand)]
        action: PlugAction,
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Configure hook of the snap: `snapctl get -d` JSON on stdin → validated YAML config.
    /// Prints `changed` or `unchanged`; exits 1 naming the bad `snap set` key.
    SnapConfig {
        /// Where the config goes (default $SNAP_DATA/outpost.yaml).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Ask `snapctl get -d` for every config key instead of reading stdin.
        #[arg(long)]
        from_snapctl: bool,
    },
    /// pre-refresh hook of the snap: copy the versioned state files into $SNAP_DATA/pre-refresh,
    /// which this revision puts back if it is started again on files a newer one migrated.
    SnapSaveState,
    /// Health check (the snap's check-health hook): the broker answers and bridge spools open.
    Health {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Time-limited access grants on topics.
    Grants {
        #[command(subcommand)]
        action: GrantAction,
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Hand a device its key and MQTT settings over UART or BLE (docs/provisioning.md).
    Provision {
        #[command(subcommand)]
        how: ProvisionHow,
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Print the built-in default config.
    DefaultConfig,
    /// Read a password from stdin and print its argon2 hash for broker.users[].password_hash.
    Passwd,
}

#[derive(clap::Args)]
struct ProvisionArgs {
    /// The device (from `outpost devices add`).
    #[arg(long)]
    device: String,
    /// The pairing code the device shows (6-32 letters or digits; spaces and `-` are ignored).
    #[arg(long)]
    code: String,
    /// The broker address the device should use (default: the first listener on a specific
    /// non-loopback address; required when the broker listens only on loopback or 0.0.0.0).
    #[arg(long)]
    mqtt_host: Option<String>,
    /// Provision a device that already is, with a new key and password.
    #[arg(long)]
    force: bool,
    /// How long to wait for the device to answer (it may also announce itself meanwhile).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait: std::time::Duration,
    #[arg(long, requires = "wifi_password")]
    wifi_ssid: Option<String>,
    #[arg(long)]
    wifi_password: Option<String>,
}

#[derive(Subcommand)]
enum ProvisionHow {
    /// Over a serial port (e.g. /dev/ttyUSB0).
    Uart {
        port: String,
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        #[command(flatten)]
        args: ProvisionArgs,
    },
    /// Over Bluetooth LE, to a device advertising the provisioning service.
    Ble {
        /// Part of the device's advertised name.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        args: ProvisionArgs,
    },
    /// List devices advertising the provisioning service.
    Scan,
}

#[derive(Subcommand)]
enum GrantAction {
    /// Grant a user (or client) access to a topic filter for a while.
    Add {
        /// `user:NAME` or `client:ID`.
        #[arg(long)]
        who: String,
        #[arg(long)]
        topic: String,
        /// How long, from now (e.g. `1h`).
        #[arg(long = "for")]
        duration: String,
        /// Allow publishing too (the default is subscribe only).
        #[arg(long)]
        publish: bool,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum PlugAction {
    List,
}

#[derive(Subcommand)]
enum DeviceAction {
    /// Create a device: id, e2e key, MQTT login. Prints what provisioning will send.
    Add {
        id: String,
        /// Also print the key and the password.
        #[arg(long)]
        show_secret: bool,
    },
    List,
    Show {
        id: String,
        #[arg(long)]
        show_secret: bool,
    },
    /// Disable a device: its connections close at once and its login stops working.
    Revoke {
        id: String,
    },
    /// A new key and password (the device must be provisioned again).
    Rotate {
        id: String,
        #[arg(long)]
        show_secret: bool,
    },
}

/// The config (file or built-in) and the data folder (`--data-dir` wins over the config's).
fn config_and_dir(config: Option<&std::path::Path>, data_dir: Option<PathBuf>) -> Result<(Config, PathBuf)> {
    let cfg = match (config, outpost::system::snap::SnapEnv::from_env()) {
        (Some(c), _) => Config::load(c)?,
        // Inside the snap: the daemon's own config (and so its data_dir, $SNAP_COMMON).
        (None, Some(snap)) => Config::load(&snap.config())?,
        (None, None) => Config::builtin(),
    };
    let dir = data_dir.unwrap_or_else(|| cfg.gateway.data_dir.clone());
    Ok((cfg, dir))
}

/// Provisions over any link, with the options every transport shares.
async fn provision_over<T: outpost::provision::protocol::Transport>(
    cfg: &Config,
    dir: &std::path::Path,
    args: &ProvisionArgs,
    link: &mut T,
) -> Result<String> {
    let wifi = args
        .wifi_ssid
        .clone()
        .zip(args.wifi_password.clone())
        .map(|(ssid, password)| outpost::provision::protocol::Wifi { ssid, password });
    let req = outpost::provision::Request {
        mqtt_host: args.mqtt_host.as_deref(),
        wifi,
        force: args.force,
        wait: args.wait,
        ..outpost::provision::Request::new(&args.device, &args.code)
    };
    outpost::provision::provision(cfg, dir, &req, link).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { config, data_dir } => run_gateway(config, data_dir),
        Command::CheckConfig { file } => Ok(check_config(&file)),
        Command::Status { config, data_dir, json } => status(config.as_deref(), data_dir, json),
        Command::Devices {
            action,
            config,
            data_dir,
        } => {
            let (cfg, dir) = config_and_dir(config.as_deref(), data_dir)?;
            outpost::devices::cli::run(action.into(), &cfg, &dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugs {
            action: PlugAction::List,
            config,
            data_dir,
        } => plugs_list(config.as_deref(), data_dir),
        Command::SnapConfig { out, from_snapctl } => snap_config(out, from_snapctl),
        Command::SnapSaveState => snap_save_state(),
        Command::Health { config } => health(config.as_deref()),
        Command::Grants {
            action,
            config,
            data_dir,
        } => grants(action, config.as_deref(), data_dir),
        Command::Provision { how, config, data_dir } => provision(how, config.as_deref(), data_dir),
        Command::DefaultConfig => {
            print!("{}", outpost::config::DEFAULT_YAML);
            Ok(ExitCode::SUCCESS)
        }
        Command::Passwd => passwd(),
    }
}

/// `outpost run`: the gateway on a multi-threaded runtime until a stop signal.
fn run_gateway(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<ExitCode> {
    let mut cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config::builtin(),
    };
    if let Some(d) = &data_dir {
        cfg.gateway.data_dir = d.clone();
    }
    outpost::system::logging::init(cfg.log.level.filter());
    if let Some(snap) = outpost::system::snap::SnapEnv::from_env() {
        for note in outpost::system::revert::restore_newer(&cfg.gateway.data_dir, &snap.data.join("pre-refresh"))? {
            log::warn!("{note}");
        }
    }
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outpost")
        .build()?;
    rt.block_on(outpost::gateway::run(cfg, config, data_dir))?;
    // Blocking threads (stores, plug polls) may still be finishing; give them a second.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

/// `outpost check-config`: 0 if the file is valid, else 1 with the error on stderr.
fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// The running gateway's `status.json` in `dir`, as text.
fn read_status_file(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("status.json");
    std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (is outpost running with this data_dir?)", path.display()))
}

/// `outpost status`: the status document, rendered or raw.
fn status(config: Option<&std::path::Path>, data_dir: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let (_, dir) = config_and_dir(config, data_dir)?;
    let text = read_status_file(&dir)?;
    if json {
        println!("{text}");
    } else {
        let doc: outpost::status_doc::StatusDoc = serde_json::from_str(&text)?;
        print!("{}", outpost::status::render(&doc, std::time::SystemTime::now()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost plugs list`: the plugs part of the status document.
fn plugs_list(config: Option<&std::path::Path>, data_dir: Option<PathBuf>) -> Result<ExitCode> {
    let (_, dir) = config_and_dir(config, data_dir)?;
    let text = read_status_file(&dir)?;
    let doc: outpost::status_doc::StatusDoc = serde_json::from_str(&text)?;
    print!("{}", outpost::status::render_plugs(&doc));
    Ok(ExitCode::SUCCESS)
}

/// `outpost snap-config` (the snap's configure hook).
fn snap_config(out: Option<PathBuf>, from_snapctl: bool) -> Result<ExitCode> {
    let out = match out {
        Some(o) => o,
        None => PathBuf::from(
            std::env::var_os("SNAP_DATA").ok_or_else(|| anyhow::anyhow!("SNAP_DATA is not set: pass --out"))?,
        )
        .join("outpost.yaml"),
    };
    let mut json = String::new();
    if from_snapctl {
        json = outpost::system::snap::from_snapctl().map_err(anyhow::Error::msg)?;
    } else {
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut json)?;
    }
    let common = std::env::var_os("SNAP_COMMON").map(PathBuf::from);
    match outpost::system::snap::apply(&json, &out, common.as_deref()) {
        Ok(outpost::system::snap::Outcome::Changed) => println!("changed"),
        Ok(outpost::system::snap::Outcome::Unchanged) => println!("unchanged"),
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost snap-save-state` (the snap's pre-refresh hook).
fn snap_save_state() -> Result<ExitCode> {
    let snap = outpost::system::snap::SnapEnv::from_env()
        .ok_or_else(|| anyhow::anyhow!("not inside the snap ($SNAP, $SNAP_DATA, $SNAP_COMMON)"))?;
    let (_, dir) = config_and_dir(None, None)?;
    for f in outpost::system::revert::save(&dir, &snap.data.join("pre-refresh"))? {
        println!("kept a copy of {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost health` (the snap's check-health hook).
fn health(config: Option<&std::path::Path>) -> Result<ExitCode> {
    let (cfg, _) = config_and_dir(config, None)?;
    match outpost::system::health::check(&cfg) {
        Ok(()) => {
            println!("healthy");
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            for p in problems {
                eprintln!("unhealthy: {p}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// `outpost grants add|list|revoke`.
fn grants(action: GrantAction, config: Option<&std::path::Path>, data_dir: Option<PathBuf>) -> Result<ExitCode> {
    let (_, dir) = config_and_dir(config, data_dir)?;
    let path = outpost::grants::path(&dir);
    outpost::system::logging::init(log::LevelFilter::Info);
    match action {
        GrantAction::Add {
            who,
            topic,
            duration,
            publish,
        } => grant_add(&path, who, topic, &duration, publish)?,
        GrantAction::List => grant_list(&path)?,
        GrantAction::Revoke { id } => {
            outpost::grants::revoke(&path, &id)?;
            println!("grant {id} revoked: a running gateway applies it within a second");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost grants add`: from now, for `duration`.
fn grant_add(path: &std::path::Path, who: String, topic: String, duration: &str, publish: bool) -> Result<()> {
    let now = outpost::system::clock::now_secs();
    let secs = humantime::parse_duration(duration)
        .map_err(|e| anyhow::anyhow!("--for `{duration}`: {e}"))?
        .as_secs();
    let g = outpost::grants::Grant {
        id: String::new(),
        who,
        filter: topic,
        subscribe: true,
        publish,
        not_before: now,
        expires: now + secs,
        created: 0,
        source: "cli".into(),
        revoked: false,
    };
    let g = outpost::grants::add(path, g, None)?;
    println!("grant {} until {}", g.id, g.expires);
    Ok(())
}

/// `outpost grants list`: one line a grant, with its state now.
fn grant_list(path: &std::path::Path) -> Result<()> {
    let now = outpost::system::clock::now_secs();
    println!(
        "{:<14} {:<20} {:<28} {:<10} {:<8} SOURCE",
        "GRANT", "WHO", "TOPIC", "RIGHTS", "STATE"
    );
    for g in outpost::grants::load(path)?.grants {
        let state = if g.revoked {
            "revoked"
        } else if g.active(now) {
            "active"
        } else if now < g.not_before {
            "future"
        } else {
            "expired"
        };
        let rights = match (g.subscribe, g.publish) {
            (true, true) => "sub+pub",
            (true, false) => "sub",
            _ => "pub",
        };
        println!(
            "{:<14} {:<20} {:<28} {:<10} {:<8} {} (until {})",
            g.id, g.who, g.filter, rights, state, g.source, g.expires
        );
    }
    Ok(())
}

/// `outpost provision uart|ble|scan`, on a single-threaded runtime.
fn provision(how: ProvisionHow, config: Option<&std::path::Path>, data_dir: Option<PathBuf>) -> Result<ExitCode> {
    let (cfg, dir) = config_and_dir(config, data_dir)?;
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use outpost::provision::{ble, uart};
        let hw = match how {
            ProvisionHow::Uart { port, baud, args } => {
                eprintln!("provisioning {} over {port} at {baud} baud...", args.device);
                let mut link = uart::open(&port, baud)?;
                provision_over(&cfg, &dir, &args, &mut link).await?
            }
            ProvisionHow::Ble { name, args } => {
                eprintln!("scanning for a device advertising the provisioning service...");
                let mut link = ble::Ble::connect(&name, std::time::Duration::from_secs(5)).await?;
                let res = provision_over(&cfg, &dir, &args, &mut link).await;
                link.close().await;
                res?
            }
            ProvisionHow::Scan => {
                for (_, name) in ble::scan(std::time::Duration::from_secs(5)).await? {
                    println!("{name}");
                }
                return Ok::<_, anyhow::Error>(());
            }
        };
        println!("provisioned (device hardware id {hw})");
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `outpost passwd`: a password on stdin, its argon2 hash on stdout.
fn passwd() -> Result<ExitCode> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\n', '\r']);
    if pw.is_empty() {
        anyhow::bail!("no password on stdin: use `echo -n SECRET | outpost passwd`");
    }
    println!("{}", outpost::broker::auth::hash_password(pw));
    Ok(ExitCode::SUCCESS)
}

impl From<DeviceAction> for outpost::devices::cli::Action {
    fn from(a: DeviceAction) -> Self {
        use outpost::devices::cli::Action as A;
        match a {
            DeviceAction::Add { id, show_secret } => A::Add { id, show_secret },
            DeviceAction::List => A::List,
            DeviceAction::Show { id, show_secret } => A::Show { id, show_secret },
            DeviceAction::Revoke { id } => A::Revoke { id },
            DeviceAction::Rotate { id, show_secret } => A::Rotate { id, show_secret },
        }
    }
}
