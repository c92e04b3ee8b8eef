//! Plain-text tables and JSON printing.

use serde::Serialize;

/// Prints rows as a left-aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable output"));
}

pub fn json_line<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string(value).expect("serializable output"));
}

/// A metric value in a short human form.
pub fn num(value: f64) -> String {
    if value.abs() >= 1000.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if value.abs() >= 0.01 {
        format!("{value:.4}")
    } else {
        format!("{value:.3e}")
    }
}
