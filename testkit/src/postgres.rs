//! A real PostgreSQL server of a test's own, in a temporary directory.
//!
//! The hub's store runs on PostgreSQL across machines, so its suites run against the real server,
//! not a stand-in. [`Postgres::start`] makes a fresh cluster with `initdb` and starts it on a free
//! port of 127.0.0.1, its unix socket in the same directory, so any number of test binaries run
//! side by side. Tests that share one server each take a database of their own from
//! [`Postgres::database`] under a name no other test uses.
//!
//! Nothing here skips: a machine without the server binaries gets an error naming them and
//! `cargo xtask install`, which installs them. PostgreSQL refuses to run as root, so when the tests
//! do, the server's own tools run as the `postgres` system user (created by Debian's package)
//! through `runuser`, in a directory handed to that user.
//!
//! Dropping a [`Postgres`] stops its server in immediate mode and removes the directory. A test
//! process killed outright leaves its server running: nothing in the process outlives it to stop it.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// The role `initdb` creates as superuser; every URL connects as it, with trust authentication.
const USER: &str = "outpost";

/// Where Debian installs each major version's server, as `<N>/bin`.
const DEBIAN_SERVERS: &str = "/usr/lib/postgresql";

/// The error when no server binaries are found.
const NOT_FOUND: &str = "PostgreSQL server not found (initdb, pg_ctl) on PATH or under \
                         /usr/lib/postgresql/<N>/bin: `cargo xtask install` installs Debian's \
                         postgresql";

/// How many free ports a start tries: another process may take a port between our probe and the
/// server's bind.
const START_ATTEMPTS: usize = 5;

/// Seconds `pg_ctl` waits for the server to accept connections, or to stop.
const PG_CTL_TIMEOUT: &str = "60";

/// How many of the server log's last lines an error carries.
const LOG_TAIL_LINES: usize = 30;

/// Variables libpq and the server's tools read, cleared so the caller's environment cannot point
/// a command at another server or database.
const PG_VARIABLES: [&str; 7] = [
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
];

/// The directory holding `initdb`, `pg_ctl`, `postgres`, `createdb` and `psql`: the one of the
/// `initdb` on `PATH` (symbolic links followed), else the newest `/usr/lib/postgresql/<N>/bin`.
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(initdb) = on_path("initdb") {
        let real = fs::canonicalize(&initdb)
            .map_err(|error| format!("resolving {}: {error}", initdb.display()))?;
        if let Some(dir) = real.parent() {
            if dir.join("pg_ctl").is_file() {
                return Ok(dir.to_path_buf());
            }
        }
    }
    let newest = fs::read_dir(DEBIAN_SERVERS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major);
    newest
        .map(|(_, bin)| bin)
        .ok_or_else(|| NOT_FOUND.to_owned())
}

/// The first file called `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whom the server and its tools run as.
#[derive(Debug, Clone, Copy)]
enum Owner {
    /// The test process's own user.
    Me,
    /// The `postgres` system user, through `runuser`: the tests run as root.
    PostgresUser { uid: u32, gid: u32 },
}

impl Owner {
    fn for_this_process() -> Result<Owner, String> {
        if id(&["-u"])? != 0 {
            return Ok(Owner::Me);
        }
        let missing = |error: String| {
            format!(
                "the tests run as root, which PostgreSQL refuses, and there is no `postgres` user \
                 to run it as ({error}): `cargo xtask install` installs Debian's postgresql, \
                 which creates it"
            )
        };
        let uid = id(&["-u", "postgres"]).map_err(missing)?;
        let gid = id(&["-g", "postgres"]).map_err(missing)?;
        if on_path("runuser").is_none() {
            return Err(
                "the tests run as root and PostgreSQL must run as `postgres`, but there is \
                        no runuser (util-linux) to switch to it"
                    .to_owned(),
            );
        }
        Ok(Owner::PostgresUser { uid, gid })
    }
}

/// A number `id` prints: the std library does not say who the process runs as.
fn id(args: &[&str]) -> Result<u32, String> {
    let output = Command::new("id")
        .args(args)
        .output()
        .map_err(|error| format!("running id: {error}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "`id {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    text.trim()
        .parse()
        .map_err(|_| format!("`id {}` printed {text:?}", args.join(" ")))
}

/// Runs `command` to its end; its stdout when it succeeds, else an error with `what` and stderr.
fn run(command: &mut Command, what: &str) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|error| format!("{what}: running {command:?}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{what}: {command:?} failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        ))
    }
}

/// A PostgreSQL server of its own in a temporary directory, stopped (immediate mode) and removed
/// on drop.
#[derive(Debug)]
pub struct Postgres {
    /// Holds `data/` (the cluster), `log` (the server's log) and the unix socket.
    dir: tempfile::TempDir,
    /// The server binaries, from [`bin_dir`].
    bin: PathBuf,
    owner: Owner,
    /// The TCP port on 127.0.0.1 (and the unix socket's name); kept across [`Postgres::restart`].
    port: u16,
}

impl Postgres {
    /// Starts one: `initdb` into a new temporary directory, then the server on a free port of
    /// 127.0.0.1 with trust authentication for the superuser `outpost`. It accepts connections
    /// when this returns.
    pub fn start() -> Result<Postgres, String> {
        let bin = bin_dir()?;
        let owner = Owner::for_this_process()?;
        let dir = tempfile::Builder::new()
            .prefix("outpost-postgres-")
            .tempdir()
            .map_err(|error| format!("creating a directory for PostgreSQL: {error}"))?;
        if let Owner::PostgresUser { uid, gid } = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|error| {
                format!(
                    "handing {} to the postgres user: {error}",
                    dir.path().display()
                )
            })?;
        }
        if dir.path().to_string_lossy().contains(['\'', ' ']) {
            // The socket directory goes through pg_ctl's shell command line.
            return Err(format!(
                "PostgreSQL's directory {} holds a quote or a space: set TMPDIR to a plainer path",
                dir.path().display()
            ));
        }
        let mut server = Postgres {
            dir,
            bin,
            owner,
            port: 0,
        };
        let data = server.data();
        // No sync: a test's cluster need not survive a power cut, and syncing it costs seconds.
        // The server itself keeps its durable defaults, which the restart tests rely on.
        run(
            server
                .server_tool("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale"])
                .arg("--no-sync"),
            "creating a PostgreSQL cluster",
        )?;
        let mut attempt = 1;
        loop {
            server.port = crate::ports::free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => return Ok(server),
                Err(error)
                    if attempt < START_ATTEMPTS && error.contains("Address already in use") =>
                {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// A new, empty database called `name` (lower-case letters, digits and `_`), and its URL:
    /// `postgres://outpost@127.0.0.1:PORT/NAME`. Tests sharing a server each take their own name.
    pub fn database(&self, name: &str) -> Result<String, String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
        if !valid {
            return Err(format!(
                "database name {name:?} is not 1 to 63 of a-z, 0-9 and _"
            ));
        }
        run(
            self.client_tool("createdb").arg(name),
            &format!("creating database {name}"),
        )?;
        Ok(self.database_url(name))
    }

    /// The URL of the default database, `postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `sql` with `psql` in `database`, stopping at the first error; the rows it prints,
    /// unaligned, one a line, with `|` between columns and no header.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        run(
            self.client_tool("psql")
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
                .arg(database)
                .arg("-c")
                .arg(sql),
            &format!("running SQL in {database}"),
        )
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`), for a test of what a client does
    /// without it; [`Postgres::restart`] brings it back.
    pub fn stop(&mut self) -> Result<(), String> {
        self.pg_ctl_stop("fast")
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`: no checkpoint), so
    /// the restart recovers from its write-ahead log.
    pub fn crash(&mut self) -> Result<(), String> {
        self.pg_ctl_stop("immediate")
    }

    /// Starts the stopped server again on the same data directory and port.
    pub fn restart(&mut self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// The server's log so far, for a test's failure message.
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn database_url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// One of the server's own tools (`initdb`, `pg_ctl`), run as the server's owner from its
    /// directory: the postgres user may not enter the test's working directory.
    fn server_tool(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut command = match self.owner {
            Owner::Me => Command::new(program),
            Owner::PostgresUser { .. } => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(program);
                command
            }
        };
        command.current_dir(self.dir.path());
        for variable in PG_VARIABLES {
            command.env_remove(variable);
        }
        command
    }

    /// A client tool (`createdb`, `psql`) of the same installation, connecting over TCP as
    /// `outpost`; trust authentication lets any local user do so.
    fn client_tool(&self, tool: &str) -> Command {
        let mut command = Command::new(self.bin.join(tool));
        for variable in PG_VARIABLES {
            command.env_remove(variable);
        }
        command
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .arg("--no-password");
        command
    }

    /// `pg_ctl start -w` on `self.port`: returns once the server accepts connections, or with
    /// an error carrying what the server logged meanwhile.
    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let logged_before = fs::metadata(self.log_path()).map_or(0, |meta| meta.len() as usize);
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories='{}' \
             -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let started = run(
            self.server_tool("pg_ctl")
                .arg("start")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", PG_CTL_TIMEOUT, "-o", &options]),
            &format!("starting PostgreSQL on 127.0.0.1:{}", self.port),
        );
        started.map(drop).map_err(|error| {
            // A server that never became ready may still be running: stop it before a retry.
            let _ = self.pg_ctl_stop("immediate");
            let log = self.log();
            let new = log.get(logged_before..).unwrap_or(&log);
            let lines: Vec<&str> = new.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            format!("{error}\nthe server's log ends:\n{tail}")
        })
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), String> {
        run(
            self.server_tool("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(self.data())
                .args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT]),
            &format!("stopping PostgreSQL ({mode})"),
        )
        .map(drop)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A server stopped by the test has no pid file, and pg_ctl need not run.
        if self.data().join("postmaster.pid").exists() {
            let _ = self.pg_ctl_stop("immediate");
        }
    }
}
