//! `outpost-hub admin migrate`: a store of release 0.1 (sled, in `DATA/db`) copied into the SQL
//! store, in one transaction. The records' bytes are kept as they are (the SQL store reads every
//! form 0.1 wrote); what sled kept in its keys becomes columns. sled is opened here and nowhere
//! else in the hub.

use std::path::Path;

use super::*;

/// Where release 0.1 kept its store in a data directory.
fn sled_dir(dir: &Path) -> PathBuf {
    dir.join("db")
}

/// Whether `dir` holds a sled store of release 0.1.
pub fn has_sled_store(dir: &Path) -> bool {
    sled_dir(dir).join("conf").is_file()
}

/// The marker a finished import leaves in `meta`, in the same transaction as the rows.
const IMPORTED: &str = "imported_from_sled";

/// How many rows of each table an import wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    pub tables: Vec<(&'static str, u64)>,
}

impl std::fmt::Display for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .tables
            .iter()
            .map(|(table, rows)| format!("{table} {rows}"))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

fn bad_key(tree: &'static str) -> StoreError {
    StoreError::Import(format!(
        "the sled store's {tree} tree holds a key of another shape"
    ))
}

fn be_u64(tree: &'static str, bytes: &[u8]) -> Result<i64> {
    let value = <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| bad_key(tree))?;
    int(tree, value)
}

/// `name \0 rest`, as sled keys held a model name ahead of fixed-width fields.
fn split_name<'a>(tree: &'static str, key: &'a [u8]) -> Result<(String, &'a [u8])> {
    let at = key
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| bad_key(tree))?;
    let name = std::str::from_utf8(&key[..at]).map_err(|_| bad_key(tree))?;
    Ok((name.to_owned(), &key[at + 1..]))
}

impl Store {
    /// Whether this store was filled by [`Store::import_sled`].
    pub async fn imported(&self) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM meta WHERE key = $1")
            .bind(IMPORTED)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Copies the sled store of release 0.1 in `dir` into this store, which must hold no
    /// devices, tokens, models or audit entries yet. One transaction: on any error nothing is
    /// written.
    ///
    /// Release 0.1 kept no hourly aggregates, so `drift_hourly` and `stats_hourly` start empty:
    /// fleet-wide drift, and error-rate and latency alert rules, see what arrives after the
    /// import. The per-device drift rows and all-time counters (`drift`, `stats`) are copied.
    pub async fn import_sled(&self, dir: &Path) -> Result<Imported> {
        if !has_sled_store(dir) {
            return Err(StoreError::Import(format!(
                "{} holds no store of Outpost 0.1 (no {})",
                dir.display(),
                sled_dir(dir).join("conf").display()
            )));
        }
        let db = sled::Config::new()
            .path(sled_dir(dir))
            .open()
            .map_err(|error| {
                StoreError::Import(format!(
                    "opening the sled store in {} (is the old hub still running?): {error}",
                    sled_dir(dir).display()
                ))
            })?;
        let sled_error = |error: sled::Error| StoreError::Import(format!("reading sled: {error}"));
        let mut transaction = self.writer.begin().await?;
        for table in ["devices", "admin_tokens", "manifests", "audit", "meta"] {
            let query = match table {
                "devices" => "SELECT 1 FROM devices LIMIT 1",
                "admin_tokens" => "SELECT 1 FROM admin_tokens LIMIT 1",
                "manifests" => "SELECT 1 FROM manifests LIMIT 1",
                "audit" => "SELECT 1 FROM audit LIMIT 1",
                _ => "SELECT 1 FROM meta WHERE key <> 'flushed' LIMIT 1",
            };
            if sqlx::query(query)
                .fetch_optional(&mut *transaction)
                .await?
                .is_some()
            {
                return Err(StoreError::Import(format!(
                    "the SQL store already holds {table}: migrate into a new, empty one"
                )));
            }
        }
        let mut imported = Imported::default();
        let trees = [
            "admin_tokens",
            "enroll_tokens",
            "devices",
            "events",
            "outcomes",
            "stats",
            "drift",
            "shadow",
            "telemetry_seen",
            "signed_at",
            "roots",
            "manifests",
            "rollouts",
            "retirements",
            "runtimes",
            "audit",
            "meta",
        ];
        for tree_name in trees {
            let tree = db.open_tree(tree_name).map_err(sled_error)?;
            let mut rows = 0u64;
            for entry in tree.iter() {
                let (key, value) = entry.map_err(sled_error)?;
                let (key, value) = (key.as_ref(), value.to_vec());
                let query = match tree_name {
                    "admin_tokens" => {
                        let id = super::registry::decode_admin_token(&value)?.id;
                        sqlx::query(
                            "INSERT INTO admin_tokens (token_hash, id, record) VALUES ($1, $2, $3)",
                        )
                        .bind(key.to_vec())
                        .bind(id)
                        .bind(value)
                    }
                    "enroll_tokens" => {
                        let id = decode::<EnrollTokenRecord>("enroll_tokens", &value)?.id;
                        sqlx::query(
                            "INSERT INTO enroll_tokens (token_hash, id, record) VALUES ($1, $2, $3)",
                        )
                        .bind(key.to_vec())
                        .bind(id)
                        .bind(value)
                    }
                    "devices" => sqlx::query("INSERT INTO devices (id, record) VALUES ($1, $2)")
                        .bind(key.to_vec())
                        .bind(value),
                    // Keys are device then a counter, so each device's events arrive in order
                    // and take increasing ids.
                    "events" => {
                        let device = key.get(..16).ok_or_else(|| bad_key("events"))?;
                        sqlx::query("INSERT INTO events (device, record) VALUES ($1, $2)")
                            .bind(device.to_vec())
                            .bind(value)
                    }
                    "outcomes" => {
                        if key.len() != 24 {
                            return Err(bad_key("outcomes"));
                        }
                        sqlx::query(
                            "INSERT INTO outcomes (plan_sequence, device, record) VALUES ($1, $2, $3)",
                        )
                        .bind(be_u64("outcomes", &key[..8])?)
                        .bind(key[8..].to_vec())
                        .bind(value)
                    }
                    "stats" => {
                        let device = key.get(..16).ok_or_else(|| bad_key("stats"))?;
                        let (name, version) = split_name("stats", &key[16..])?;
                        sqlx::query(
                            "INSERT INTO stats (device, model, version, record) VALUES ($1, $2, $3, $4)",
                        )
                        .bind(device.to_vec())
                        .bind(name)
                        .bind(be_u64("stats", version)?)
                        .bind(value)
                    }
                    "drift" => {
                        let (name, rest) = split_name("drift", key)?;
                        if rest.len() != 40 {
                            return Err(bad_key("drift"));
                        }
                        sqlx::query(
                            "INSERT INTO drift (model, version, window_end, window_start, device, \
                             record) VALUES ($1, $2, $3, $4, $5, $6)",
                        )
                        .bind(name)
                        .bind(be_u64("drift", &rest[..8])?)
                        .bind(be_u64("drift", &rest[8..16])?)
                        .bind(be_u64("drift", &rest[16..24])?)
                        .bind(rest[24..].to_vec())
                        .bind(value)
                    }
                    "shadow" => {
                        if key.len() < 64 {
                            return Err(bad_key("shadow"));
                        }
                        let (name, version) = split_name("shadow", &key[64..])?;
                        sqlx::query(
                            "INSERT INTO shadow (target, window_end, window_start, device, \
                             active_model, active_version, record) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        )
                        .bind(key[..32].to_vec())
                        .bind(be_u64("shadow", &key[32..40])?)
                        .bind(be_u64("shadow", &key[40..48])?)
                        .bind(key[48..64].to_vec())
                        .bind(name)
                        .bind(be_u64("shadow", version)?)
                        .bind(value)
                    }
                    "telemetry_seen" => {
                        if key.len() != 24 {
                            return Err(bad_key("telemetry_seen"));
                        }
                        sqlx::query(
                            "INSERT INTO telemetry_seen (device, sequence, stored_at) \
                             VALUES ($1, $2, $3)",
                        )
                        .bind(key[..16].to_vec())
                        .bind(be_u64("telemetry_seen", &key[16..])?)
                        .bind(be_u64("telemetry_seen", &value)?)
                    }
                    "signed_at" => {
                        sqlx::query("INSERT INTO signed_at (device, latest) VALUES ($1, $2)")
                            .bind(key.to_vec())
                            .bind(value)
                    }
                    "roots" => sqlx::query("INSERT INTO roots (version, signed) VALUES ($1, $2)")
                        .bind(be_u64("roots", key)?)
                        .bind(value),
                    "manifests" => {
                        let (name, version) = split_name("manifests", key)?;
                        sqlx::query(
                            "INSERT INTO manifests (model, version, record) VALUES ($1, $2, $3)",
                        )
                        .bind(name)
                        .bind(be_u64("manifests", version)?)
                        .bind(value)
                    }
                    "rollouts" => {
                        sqlx::query("INSERT INTO rollouts (sequence, record) VALUES ($1, $2)")
                            .bind(be_u64("rollouts", key)?)
                            .bind(value)
                    }
                    "retirements" => {
                        sqlx::query("INSERT INTO retirements (sequence, record) VALUES ($1, $2)")
                            .bind(be_u64("retirements", key)?)
                            .bind(value)
                    }
                    "runtimes" => {
                        let at = decode::<RuntimeReportRecord>("runtimes", &value)?.at;
                        sqlx::query("INSERT INTO runtimes (device, at, record) VALUES ($1, $2, $3)")
                            .bind(key.to_vec())
                            .bind(int("report time", at)?)
                            .bind(value)
                    }
                    "audit" => sqlx::query("INSERT INTO audit (seq, record) VALUES ($1, $2)")
                        .bind(be_u64("audit", key)?)
                        .bind(value),
                    _ => {
                        let key = std::str::from_utf8(key).map_err(|_| bad_key("meta"))?;
                        if key != super::audit::AUDIT_HEAD {
                            return Err(StoreError::Import(format!(
                                "the sled store's meta tree holds {key:?}, which this hub does \
                                 not know"
                            )));
                        }
                        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2)")
                            .bind(super::audit::AUDIT_HEAD)
                            .bind(value)
                    }
                };
                query.execute(&mut *transaction).await?;
                rows += 1;
            }
            imported.tables.push((tree_name, rows));
        }
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2)")
            .bind(IMPORTED)
            .bind(crate::unix_now().to_be_bytes().to_vec())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        self.flush().await?;
        Ok(imported)
    }
}
