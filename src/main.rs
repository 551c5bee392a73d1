//! The `taas` command: the only place that knows the CLI. argh flags and the TOML
//! file become one validated `Config`; each subcommand calls the library. Errors
//! end here as one line on stderr and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use argh::FromArgs;
use taas::store::{Account, Store};
use taas::{Config, Error, Result, Server};

/// taas: reach servers hidden behind NAT through this relay (TAAS protocol).
#[derive(FromArgs)]
struct Cli {
    /// print the version and the git revision it was built from
    #[argh(switch)]
    version: bool,
    /// what to do
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Serve(Serve),
    Users(Users),
    Cert(CertCmd),
    Expose(Expose),
    Token(Token),
    Admin(Admin),
}

/// serve the accounts web page (loopback only unless --public)
#[derive(FromArgs)]
#[argh(subcommand, name = "admin")]
struct Admin {
    /// config file (default ./taas.toml when it exists, else built-in defaults)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// address to listen on (default 127.0.0.1:8893)
    #[argh(option, default = "taas::admin::DEFAULT_LISTEN")]
    listen: std::net::SocketAddr,
    /// allow a non-loopback --listen address (the page then reaches other hosts)
    #[argh(switch)]
    public: bool,
}

/// the hidden-server agent: keep registrations waiting and pipe each relayed
/// connection to a local service
#[derive(FromArgs)]
#[argh(subcommand, name = "expose")]
struct Expose {
    /// the provisioning file (ID.json or legacy ID.js)
    #[argh(positional)]
    provision: PathBuf,
    /// the local service, HOST:PORT
    #[argh(option)]
    to: String,
    /// registrations kept waiting at each relay (default 5)
    #[argh(option, default = "5")]
    pool: usize,
    /// a relay node to keep the pool waiting at, HOST:PORT; repeat for each
    /// node (default: every address the file's server.hostname resolves to)
    #[argh(option)]
    relay: Vec<String>,
    /// the label to serve when the file has several (default: the first)
    #[argh(option)]
    label: Option<String>,
    /// connect to the local service before the mobile client speaks (for
    /// protocols where the server speaks first: SMTP, FTP; not with --tls)
    #[argh(switch)]
    eager: bool,
    /// end TLS here, with the label certificate, and pipe the plaintext to
    /// --to (for a plain-HTTP app reached over HTTPS)
    #[argh(switch)]
    tls: bool,
    /// with --tls: the certificate chain to serve (default: ID.crt beside the
    /// provisioning file); SIGHUP re-reads it
    #[argh(option)]
    cert: Option<PathBuf>,
    /// with --tls: its private key (default: ID.key beside the provisioning file)
    #[argh(option)]
    key: Option<PathBuf>,
}

/// run the relay: registrar, rendezvous ports and relay
#[derive(FromArgs)]
#[argh(subcommand, name = "serve")]
struct Serve {
    /// config file (default ./taas.toml when it exists, else built-in defaults)
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// manage hidden-server accounts
#[derive(FromArgs)]
#[argh(subcommand, name = "users")]
struct Users {
    /// what to do with accounts
    #[argh(subcommand)]
    command: UsersCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum UsersCommand {
    Add(UsersAdd),
    Cert(UsersCert),
    List(UsersList),
    Remove(UsersRemove),
}

/// create an account and write its provisioning files ID.json and ID.js, and
/// its label certificate ID.crt with its key ID.key
#[derive(FromArgs)]
#[argh(subcommand, name = "add")]
struct UsersAdd {
    /// the label the account may register; LABEL:PORT also gives it the fixed
    /// rendezvous port PORT (outside port_range), as the original stores it
    #[argh(positional)]
    label: String,
    /// use this UUID instead of a new one
    #[argh(option)]
    id: Option<String>,
    /// where to write the provisioning files (default: the current directory)
    #[argh(option, default = "PathBuf::from(\".\")")]
    out: PathBuf,
    /// config file
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// issue (again) the certificate for every label of an account, from the
/// relay's CA, as ID.crt and ID.key
#[derive(FromArgs)]
#[argh(subcommand, name = "cert")]
struct UsersCert {
    /// the account ID
    #[argh(positional)]
    id: String,
    /// where to write ID.crt and ID.key (default: the current directory)
    #[argh(option, default = "PathBuf::from(\".\")")]
    out: PathBuf,
    /// config file
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// list accounts: ID and labels, one a line
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct UsersList {
    /// config file
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// delete an account
#[derive(FromArgs)]
#[argh(subcommand, name = "remove")]
struct UsersRemove {
    /// the account ID
    #[argh(positional)]
    id: String,
    /// config file
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// write the relay's name-constrained CA and the registrar's key and
/// certificate signed by it, whichever are missing (keys 0400, certificates 0444)
#[derive(FromArgs)]
#[argh(subcommand, name = "cert")]
struct CertCmd {
    /// config file
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// print the current TOTP token of a provisioning file
#[derive(FromArgs)]
#[argh(subcommand, name = "token")]
struct Token {
    /// the provisioning file (ID.json or legacy ID.js)
    #[argh(positional)]
    provision: PathBuf,
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taas: {e}");
            ExitCode::FAILURE
        }
    }
}

/// argh's parse, with its errors folded into one line (docs/INTERFACE.md: one clear
/// line on failure); `--help` goes to stdout and exits 0.
fn parse_args() -> std::result::Result<Cli, ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .first()
        .map_or("taas", |a| a.rsplit('/').next().unwrap_or(a));
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match Cli::from_args(&[name], &rest) {
        Ok(cli) => Ok(cli),
        Err(argh::EarlyExit {
            output,
            status: Ok(()),
        }) => {
            println!("{output}");
            Err(ExitCode::SUCCESS)
        }
        Err(argh::EarlyExit { output, .. }) => {
            let line: Vec<&str> = output
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Run "))
                .collect();
            eprintln!("taas: {}", line.join("; "));
            Err(ExitCode::FAILURE)
        }
    }
}

fn try_main(cli: Cli) -> Result<()> {
    if cli.version {
        println!("taas {}", taas::version());
        return Ok(());
    }
    let Some(command) = cli.command else {
        return Err(Error::Usage(
            "no command; try `taas serve` or `taas --help`".into(),
        ));
    };
    match command {
        Command::Serve(a) => {
            let config = Config::load(a.config.as_deref())?;
            taas::logging::init(config.log_file.as_deref())?;
            serve(config)
        }
        Command::Users(u) => match u.command {
            UsersCommand::Add(a) => users_add(&a),
            UsersCommand::Cert(a) => users_cert(&a),
            UsersCommand::List(a) => {
                let store = open_store(a.config.as_deref())?.1;
                for account in store.list()? {
                    println!("{} {}", account.uuid, account.labels.join(","));
                }
                Ok(())
            }
            UsersCommand::Remove(a) => {
                open_store(a.config.as_deref())?.1.remove(&a.id)?;
                eprintln!("removed account {}", a.id);
                Ok(())
            }
        },
        Command::Cert(a) => {
            let config = Config::load(a.config.as_deref())?;
            let made = taas::cert::write_new(&config)?;
            println!("{}", config.cert.display());
            println!("{}", config.ca_cert.display());
            eprintln!("wrote {}", made.describe(&config));
            if !made.registrar {
                eprintln!(
                    "kept the registrar's certificate {}; mobile clients trust {} for the labels",
                    config.cert.display(),
                    config.ca_cert.display()
                );
            }
            Ok(())
        }
        Command::Expose(a) => expose(a),
        Command::Admin(a) => {
            let config = Config::load(a.config.as_deref())?;
            taas::logging::init(config.log_file.as_deref())?;
            taas::admin::run(config, a.listen, a.public)
        }
        Command::Token(a) => {
            let p = taas::provision::Provision::load(&a.provision)?;
            println!("{}", p.totp()?.generate(taas::sys::unix_time()));
            Ok(())
        }
    }
}

/// `taas serve`: first-start set-up, the relay, signals, a graceful stop.
fn serve(config: Config) -> Result<()> {
    // The CA key is read here at most once, to sign the registrar's
    // certificate at a first start, and dropped before the relay binds.
    let made = taas::cert::ensure_default(&config)?;
    if made.any() {
        log::info!("first start: made {}", made.describe(&config));
    }
    if !config.tls {
        log::warn!("tls = false: serving plain HTTP; TOTP tokens cross the network in clear");
    }
    taas::sys::raise_fd_limit();
    let grace = config.shutdown_grace;
    let server = Server::bind(config)?;
    let c = server.config();
    log::info!(
        "taas {} listening on {} (public {}), registrar {}, labels under {}, store {}, config {}",
        taas::version(),
        server.local_addr(),
        c.public_addr(server.local_addr().port()),
        c.registrar_name,
        c.servers_domain,
        c.store.describe(),
        c.source
    );
    log_accounts(server.store());
    // Accounts are read from the store at each registration; SIGHUP re-reads
    // it now, so the operator sees at once whether an edit took, and re-reads
    // the certificate (a certbot deploy hook runs `systemctl reload taas`).
    wait_for_signal(|| {
        taas::logging::reopen();
        log_accounts(server.store());
        reload_certificate(&server);
    })?;
    log::info!(
        "stopping: live pairs have {} s to finish",
        grace.as_secs_f64()
    );
    server.shutdown(grace);
    log::info!("stopped");
    Ok(())
}

/// SIGHUP: the certificate for new connections, or why the old one stays.
fn reload_certificate(server: &Server) {
    let c = server.config();
    match server.reload_tls() {
        Ok(true) => log::info!(
            "SIGHUP: certificate {} and key {} re-read; new connections get them",
            c.cert.display(),
            c.key.display()
        ),
        Ok(false) => {}
        Err(e) => log::warn!("SIGHUP: keeping the certificate loaded before: {e}"),
    }
}

/// Logs how many accounts the store holds (or why it cannot say).
fn log_accounts(store: &Store) {
    match store.list() {
        Ok(list) if list.is_empty() => {
            log::info!("no accounts yet: add one with `taas users add LABEL`")
        }
        Ok(list) => log::info!("accounts in the store: {}", list.len()),
        Err(e) => log::warn!("{e}"),
    }
}

/// Blocks until SIGTERM or SIGINT, calling `on_hup` at each SIGHUP.
fn wait_for_signal(on_hup: impl Fn()) -> Result<()> {
    taas::sys::wait_for_signal(on_hup).map_err(|e| Error::io("signal set-up", e))
}

fn open_store(path: Option<&Path>) -> Result<(Config, Store)> {
    let config = Config::load(path)?;
    let store = Store::open(&config.store)?;
    Ok((config, store))
}

fn users_add(a: &UsersAdd) -> Result<()> {
    let (config, store) = open_store(a.config.as_deref())?;
    let account = Account::new(a.id.as_deref(), std::slice::from_ref(&a.label))?;
    config.check_account(&account)?;
    // The provisioning file carries the relay's CA: make it now when the
    // defaults are in use, as `taas serve` would on first start.
    taas::cert::ensure_default(&config)?;
    let provision = taas::provision::Provision::new(&account, &config)?;
    // Issued before the insert: a missing CA leaves no account behind.
    let issued = if taas::cert::issues_label_certs(&config) {
        Some(taas::cert::issue_label_cert(&config, &account)?)
    } else {
        None
    };
    store.insert(&account)?;
    let written = provision.write(&a.out).and_then(|(json, js)| {
        let Some(issued) = &issued else {
            return Ok((json, js, None));
        };
        match taas::provision::write_label_cert(&a.out, &account.uuid, issued) {
            Ok(pair) => Ok((json, js, Some(pair))),
            Err(e) => {
                let _ = std::fs::remove_file(&json);
                let _ = std::fs::remove_file(&js);
                Err(e)
            }
        }
    });
    let (json, js, pair) = match written {
        Ok(paths) => paths,
        Err(e) => {
            // No account without its files: the secret would be lost.
            let _ = store.remove(&account.uuid);
            return Err(e);
        }
    };
    println!("{}", json.display());
    eprintln!(
        "account {} owns {}; also wrote {} (both 0600: they hold the secret)",
        account.uuid,
        account.labels.join(","),
        js.display()
    );
    match (pair, issued) {
        (Some((crt, key)), Some(issued)) => eprintln!(
            "wrote {} and {} (0600) for {}, from the relay's CA {}",
            crt.display(),
            key.display(),
            issued.names.join(", "),
            config.ca_cert.display()
        ),
        _ => eprintln!(
            "no label certificate: tls = false and no CA at {} (`taas cert` makes one, then `taas users cert {}`)",
            config.ca_cert.display(),
            account.uuid
        ),
    }
    Ok(())
}

fn users_cert(a: &UsersCert) -> Result<()> {
    let (config, store) = open_store(a.config.as_deref())?;
    let id = taas::store::parse_uuid(&a.id)?;
    let account = store.get(&id)?.ok_or(Error::NoSuchAccount(id))?;
    let issued = taas::cert::issue_label_cert(&config, &account)?;
    let (crt, key) = taas::provision::write_label_cert(&a.out, &account.uuid, &issued)?;
    println!("{}", crt.display());
    eprintln!(
        "wrote {} and {} (0600) for {}, from the relay's CA {}",
        crt.display(),
        key.display(),
        issued.names.join(", "),
        config.ca_cert.display()
    );
    Ok(())
}

fn expose(a: Expose) -> Result<()> {
    taas::logging::init(None)?;
    let p = taas::provision::Provision::load(&a.provision)?;
    let tls = label_cert(&a, &p)?.map(std::sync::Arc::new);
    // Entries may be LABEL:PORT (a fixed port); the registration names LABEL.
    let names = p
        .labels
        .iter()
        .map(|e| taas::label::Entry::parse(e).map(|e| e.name))
        .collect::<Result<Vec<_>>>()?;
    let label = match a.label {
        Some(l) => {
            let l = taas::label::validate(&l)?;
            if !names.contains(&l) {
                return Err(Error::Usage(format!(
                    "{} does not list label {l} (it has {})",
                    a.provision.display(),
                    p.labels.join(", ")
                )));
            }
            l
        }
        None => names
            .first()
            .cloned()
            .ok_or_else(|| Error::Usage(format!("{} lists no label", a.provision.display())))?,
    };
    if a.pool == 0 || a.pool > 64 {
        return Err(Error::Usage("--pool must be 1 to 64".into()));
    }
    let relays = a
        .relay
        .iter()
        .map(|r| taas::agent::parse_relay(r))
        .collect::<Result<Vec<_>>>()?;
    let registrar = taas::agent::Registrar::from_provision(&p)?;
    // Installed before the slots start: a SIGHUP from then on reloads, never kills.
    let signals = taas::sys::signals().map_err(|e| Error::io("signal set-up", e))?;
    let agent = taas::agent::Agent::start(
        registrar,
        taas::agent::ExposeConfig {
            label,
            relays,
            to: taas::agent::parse_host_port("--to", &a.to)?,
            pool: a.pool,
            eager: a.eager,
            tls: tls.clone(),
        },
    )?;
    let waited = taas::sys::wait_on(signals, || {
        taas::logging::reopen();
        let Some(cert) = &tls else { return };
        match cert.reload() {
            Ok(()) => log::info!(
                "SIGHUP: certificate {} and key {} re-read; new connections get them",
                cert.cert_path().display(),
                cert.key_path().display()
            ),
            Err(e) => log::warn!("SIGHUP: keeping the certificate loaded before: {e}"),
        }
    });
    waited.map_err(|e| Error::io("signal set-up", e))?;
    agent.stop();
    log::info!("stopped");
    Ok(())
}

/// `--tls [--cert F --key F]`: the certificate the agent serves, loaded now so
/// a missing or unreadable file is an error at start, naming it. The default is
/// `ID.crt` and `ID.key` beside the provisioning file (ID: the account's).
fn label_cert(
    a: &Expose,
    p: &taas::provision::Provision,
) -> Result<Option<taas::agent::LabelCert>> {
    if !a.tls {
        if a.cert.is_some() || a.key.is_some() {
            return Err(Error::Usage("--cert and --key go with --tls".into()));
        }
        return Ok(None);
    }
    if a.eager {
        return Err(Error::Usage(taas::agent::EAGER_TLS.into()));
    }
    let dir = a.provision.parent().unwrap_or(Path::new(""));
    let (cert, key, default) = match (&a.cert, &a.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone(), false),
        (None, None) => (
            dir.join(format!("{}.crt", p.id())),
            dir.join(format!("{}.key", p.id())),
            true,
        ),
        _ => return Err(Error::Usage("--cert and --key go together".into())),
    };
    taas::agent::LabelCert::load(&cert, &key)
        .map(Some)
        .map_err(|e| match e {
            Error::FileContent { path, reason } if default => Error::FileContent {
                path,
                reason: format!(
                    "{reason} (the label certificate `taas users add` writes beside ID.json; `taas users cert ID` issues it again; or give --cert and --key)"
                ),
            },
            e => e,
        })
}
