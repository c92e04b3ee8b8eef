//! Bounds every text a request carries must keep, checked at the edge with
//! the field named: a length, and a character set. No accepted text holds a
//! NUL (PostgreSQL refuses it), a control character (it would forge log
//! lines and break terminals) or a bidirectional override (it would make a
//! name display as another).

/// A spec or request field that cannot be accepted, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Characters that reorder how text displays (Trojan Source, CVE-2021-42574).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// A single-line text of at most `max_chars` characters, without control
/// or bidirectional characters.
pub fn line(field: &str, value: &str, max_chars: usize) -> Result<(), SpecError> {
    text(field, value, max_chars, false)
}

/// Like [`line`], but newlines and tabs are allowed (descriptions, error texts).
pub fn paragraph(field: &str, value: &str, max_chars: usize) -> Result<(), SpecError> {
    text(field, value, max_chars, true)
}

fn text(field: &str, value: &str, max_chars: usize, multiline: bool) -> Result<(), SpecError> {
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(SpecError::new(field, format!("must be at most {max_chars} characters, got {chars}")));
    }
    let allowed_control = |c: char| multiline && matches!(c, '\n' | '\t' | '\r');
    if let Some(c) = value.chars().find(|&c| (c.is_control() && !allowed_control(c)) || is_bidi_control(c)) {
        return Err(SpecError::new(
            field,
            format!("must not contain control or bidirectional characters, found U+{:04X}", c as u32),
        ));
    }
    Ok(())
}

/// A folder name (a base model under a worker's models directory): 1 to
/// 128 characters, letters, digits, `.`, `_` and `-`, not starting with a
/// dot (so never `.` or `..`, nor a hidden folder).
pub fn folder_name(field: &str, value: &str) -> Result<(), SpecError> {
    let valid = (1..=128).contains(&value.len())
        && !value.starts_with('.')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(SpecError::new(
            field,
            format!(
                "must be a folder name: 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'; got {:?}",
                shorten(value)
            ),
        ));
    }
    Ok(())
}

/// The first 40 characters of a value, for messages that quote it.
pub fn shorten(value: &str) -> String {
    let mut short: String = value.chars().take(40).collect();
    if value.chars().count() > 40 {
        short.push('…');
    }
    short
}

/// Checks every string in a JSON value (keys included) with [`paragraph`]
/// and at most `max_chars` characters, and its nesting at most 32 deep.
pub fn json_strings(field: &str, value: &serde_json::Value, max_chars: usize) -> Result<(), SpecError> {
    fn walk(field: &str, value: &serde_json::Value, max_chars: usize, depth: usize) -> Result<(), SpecError> {
        if depth > 32 {
            return Err(SpecError::new(field, "is nested more than 32 levels deep"));
        }
        match value {
            serde_json::Value::String(s) => paragraph(field, s, max_chars),
            serde_json::Value::Array(items) => items.iter().try_for_each(|v| walk(field, v, max_chars, depth + 1)),
            serde_json::Value::Object(fields) => fields.iter().try_for_each(|(k, v)| {
                let path = format!("{field}.{}", shorten(k));
                line(&path, k, 256)?;
                walk(&path, v, max_chars, depth + 1)
            }),
            _ => Ok(()),
        }
    }
    walk(field, value, max_chars, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_refuse_nul_control_and_bidi_characters_and_long_values() {
        assert!(line("name", "sst2 prompt-tuning ✓", 128).is_ok());
        for bad in ["a\0b", "a\nb", "a\u{1b}[31mb", "evil\u{202E}txt.exe", "x\u{2066}y"] {
            let e = line("name", bad, 128).unwrap_err();
            assert_eq!(e.field, "name");
            assert!(e.message.contains("control or bidirectional"), "{bad:?}: {}", e.message);
        }
        assert!(paragraph("description", "two\nlines\tand a tab", 100).is_ok());
        assert!(paragraph("description", "nul\0", 100).is_err());
        let long = "x".repeat(100_001);
        assert!(line("name", &long, 128).unwrap_err().message.contains("at most 128 characters, got 100001"));
    }

    #[test]
    fn folder_names_are_plain_names_never_paths() {
        for good in ["all-MiniLM-L6-v2", "qwen2-0.5b", "tiny_gpt2"] {
            assert!(folder_name("base_model", good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "../../etc/passwd", "a/b", ".hidden", "naïve", "a b", &"x".repeat(129)] {
            assert!(folder_name("base_model", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_strings_are_checked_deep_and_keys_too() {
        let ok = serde_json::json!({"a": ["b", {"c": "d"}], "n": 1});
        assert!(json_strings("template", &ok, 100).is_ok());
        let bad = serde_json::json!({"a": [{"c": "d\0"}]});
        assert_eq!(json_strings("template", &bad, 100).unwrap_err().field, "template.a.c");
        let bad_key = serde_json::json!({"k\u{202E}": 1});
        assert!(json_strings("template", &bad_key, 100).is_err());
    }
}
