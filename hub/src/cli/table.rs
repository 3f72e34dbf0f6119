//! How the hub commands show what a hub answered: aligned tables for people, the API's JSON for
//! scripts (`--json`).
//!
//! Everything shown here came from the hub, which is not trusted: cells are stripped of control
//! characters so a hostile name or label cannot move the cursor or rewrite the terminal.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::print_stdout;

/// `--json`, taken by every command that prints what the hub answered.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArgs {
    /// Print the hub's answer as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl OutputArgs {
    /// Prints `value` as pretty JSON, or as the text `render` makes of it.
    pub fn print<T: Serialize>(
        &self,
        value: &T,
        render: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            print_json(value)
        } else {
            print_stdout(&render(value))
        }
    }
}

/// Prints a value as pretty JSON with a final newline.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print_stdout(&text)
}

/// Rows of cells under a header, each column as wide as its widest cell.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|cell| (*cell).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank and extra ones are kept as extra columns.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.iter().map(|cell| clean(cell)).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text: columns separated by two spaces, no trailing spaces, one `\n` per row.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.header).chain(&self.rows) {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut out = String::new();
            for (column, width) in widths.iter().enumerate() {
                let cell = line.get(column).map_or("", String::as_str);
                out.push_str(cell);
                let padding = width - cell.chars().count();
                out.extend(std::iter::repeat_n(' ', padding + 2));
            }
            text.push_str(out.trim_end());
            text.push('\n');
        }
        text
    }
}

/// `key  value` lines with the values aligned, for showing one record.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(key, _)| key.chars().count())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (key, value) in pairs {
        let line = format!("{key:<width$}  {}", clean(value));
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Replaces control characters (escape sequences, newlines, tabs) with spaces.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Unix seconds as `2025-01-31T12:00:00Z`.
pub fn time(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_secs)).to_string()
}

/// How long before `now` a moment was: `42s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(unix_secs: u64, now: u64) -> String {
    let Some(elapsed) = now.checked_sub(unix_secs) else {
        return "in the future".to_owned();
    };
    match elapsed {
        0..60 => format!("{elapsed}s ago"),
        60..3600 => format!("{}m ago", elapsed / 60),
        3600..86_400 => format!("{}h ago", elapsed / 3600),
        _ => format!("{}d ago", elapsed / 86_400),
    }
}

/// A text progress bar: `[######----]`, `done` of `total` in `width` characters.
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        (u128::from(done.min(total)) * width as u128 / u128::from(total)) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// A percentage with no more decimals than it needs: `5`, `12.5`, `0.05`.
pub fn number(value: f64) -> String {
    let text = format!("{value:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_the_widest_cell() {
        let mut table = Table::new(&["ID", "STATE", "LABELS"]);
        table.row(vec!["d1".into(), "steady".into(), "site=a".into()]);
        table.row(vec!["device-22".into(), "probation".into(), String::new()]);
        table.row(vec!["d3".into(), "ok".into(), "x=y,tier=b".into()]);
        assert_eq!(
            table.render(),
            "ID         STATE      LABELS\n\
             d1         steady     site=a\n\
             device-22  probation\n\
             d3         ok         x=y,tier=b\n"
        );
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut table = Table::new(&["A", "B"]);
        table.row(vec!["é".into(), "x".into()]);
        table.row(vec!["ab".into(), "y".into()]);
        assert_eq!(table.render(), "A   B\né   x\nab  y\n");
    }

    #[test]
    fn ragged_rows_and_hostile_cells() {
        let mut table = Table::new(&["A"]);
        table.row(vec!["1".into(), "extra".into()]);
        table.row(vec!["\x1b[2Jevil\nline".into()]);
        assert_eq!(table.render(), "A\n1              extra\n [2Jevil line\n");
        assert!(!table.is_empty());
        assert_eq!(Table::new(&["ONLY"]).render(), "ONLY\n");
    }

    #[test]
    fn fields_align_values() {
        assert_eq!(
            fields(&[
                ("state", "steady".into()),
                ("last check-in", "5m ago".into())
            ]),
            "state          steady\nlast check-in  5m ago\n"
        );
    }

    #[test]
    fn times_and_bars() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(ago(100, 142), "42s ago");
        assert_eq!(ago(0, 300), "5m ago");
        assert_eq!(ago(0, 3 * 3600 + 5), "3h ago");
        assert_eq!(ago(0, 2 * 86_400), "2d ago");
        assert_eq!(ago(10, 5), "in the future");
        assert_eq!(bar(0, 10, 10), "[----------]");
        assert_eq!(bar(5, 10, 10), "[#####-----]");
        assert_eq!(bar(10, 10, 4), "[####]");
        assert_eq!(bar(99, 10, 4), "[####]");
        assert_eq!(bar(0, 0, 3), "[---]");
        assert_eq!(number(5.0), "5");
        assert_eq!(number(12.5), "12.5");
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(1.0 / 3.0), "0.3333");
    }
}
