//! Small datasets made up here, in the shapes of the shared ones (SST-2
//! sentences, WNUT-17 tagged tokens, E2E meaning representations and
//! texts), so the engine tests on tiny fixtures need no `../shared/data`.
//! The tests that use them compare runs with each other (resumed against
//! uninterrupted, packed against alone), so what the sentences say does
//! not matter, only that they are varied and deterministic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::json;

/// The folder (`train.jsonl`, `dev.jsonl`) of a made-up dataset shaped like
/// `kind`: `sst2`, `ner` or `e2e`.
pub fn dataset(kind: &str) -> PathBuf {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        for kind in ["sst2", "ner", "e2e"] {
            write(&dir.path().join(kind), kind);
        }
        dir
    });
    let dir = root.path().join(kind);
    assert!(dir.is_dir(), "no made-up dataset {kind:?}; there are sst2, ner and e2e");
    dir
}

fn write(dir: &Path, kind: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (file, n, offset) in [("train.jsonl", 128, 0), ("dev.jsonl", 32, 1000)] {
        let lines: Vec<String> = (offset..offset + n).map(|i| line(kind, i).to_string()).collect();
        std::fs::write(dir.join(file), lines.join("\n") + "\n").unwrap();
    }
}

const GOOD: [&str; 6] = ["warm", "funny", "clever", "moving", "bright", "gripping"];
const BAD: [&str; 6] = ["dull", "tired", "clumsy", "flat", "shallow", "tedious"];
const THINGS: [&str; 5] = ["film", "story", "script", "cast", "ending"];
const PEOPLE: [&str; 5] = ["Alice", "Omar", "Mei", "Jonas", "Priya"];
const PLACES: [&str; 5] = ["Paris", "Lagos", "Oslo", "Lima", "Kyoto"];
const NAMES: [&str; 5] = ["The Eagle", "Blue Spice", "The Mill", "Zizzi", "Aromi"];
const FOODS: [&str; 4] = ["French", "Italian", "Japanese", "English"];
const KINDS: [&str; 3] = ["pub", "restaurant", "coffee shop"];

fn line(kind: &str, i: usize) -> serde_json::Value {
    let pick = |words: &[&'static str], salt: usize| words[(i * 7 + salt * 3 + i / 5) % words.len()];
    match kind {
        "sst2" => {
            let positive = (i * 5 + i / 3) % 2 == 0;
            let mood = if positive { pick(&GOOD, 1) } else { pick(&BAD, 2) };
            let text = format!("a {mood} {} , and the {} is {}", pick(&THINGS, 3), pick(&THINGS, 4), pick(if positive { &GOOD } else { &BAD }, 5));
            json!({ "text": text, "label": u8::from(positive) })
        }
        "ner" => {
            let (person, place) = (pick(&PEOPLE, 1), pick(&PLACES, 2));
            let mut tokens = vec!["yesterday", person, "flew", "to", place];
            let mut tags = vec!["O", "B-person", "O", "O", "B-location"];
            if i % 3 == 0 {
                tokens.extend(["with", "Air", "France"]);
                tags.extend(["O", "B-corporation", "I-corporation"]);
            }
            tokens.push(".");
            tags.push("O");
            json!({ "tokens": tokens, "tags": tags })
        }
        "e2e" => {
            let (name, food, place) = (pick(&NAMES, 1), pick(&FOODS, 2), pick(&KINDS, 3));
            let source = format!("name[{name}], eatType[{place}], food[{food}]");
            let target = format!("{name} is a {place} serving {food} food.");
            json!({ "source": source, "target": target })
        }
        other => panic!("no made-up dataset {other:?}"),
    }
}
