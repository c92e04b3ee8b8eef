//! Corpus BLEU-4 (Papineni et al. 2002, <https://aclanthology.org/P02-1040>)
//! against one or more references per hypothesis, as sacreBLEU's
//! `corpus_bleu` computes it by default: the `13a` tokenizer (mteval-v13a),
//! n-gram counts clipped by the largest count in any reference, the
//! brevity penalty against the reference length closest to each hypothesis
//! (the shorter one on ties), and the `exp` smoothing for an order without
//! matches. Wherever every order has a match this equals NLTK's
//! `corpus_bleu` on the same tokens.

use std::collections::HashMap;

/// Largest n-gram order.
pub const MAX_ORDER: usize = 4;

/// Corpus statistics, summed over sentences.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BleuStats {
    /// Clipped matches per order (1-grams first).
    pub matches: [u64; MAX_ORDER],
    /// Hypothesis n-grams per order.
    pub totals: [u64; MAX_ORDER],
    pub hypothesis_len: u64,
    pub reference_len: u64,
}

impl BleuStats {
    /// Adds one tokenized hypothesis and its tokenized references.
    pub fn add(&mut self, hypothesis: &[&str], references: &[Vec<&str>]) {
        let hyp_len = hypothesis.len();
        self.hypothesis_len += hyp_len as u64;
        self.reference_len += closest_length(hyp_len, references.iter().map(Vec::len)) as u64;
        for n in 1..=MAX_ORDER {
            let hyp_counts = ngram_counts(hypothesis, n);
            let mut max_ref: HashMap<&[&str], u64> = HashMap::new();
            for reference in references {
                for (gram, count) in ngram_counts(reference, n) {
                    let entry = max_ref.entry(gram).or_insert(0);
                    *entry = (*entry).max(count);
                }
            }
            let matches: u64 =
                hyp_counts.iter().map(|(gram, &count)| count.min(max_ref.get(gram).copied().unwrap_or(0))).sum();
            self.matches[n - 1] += matches;
            self.totals[n - 1] += hyp_len.saturating_sub(n - 1) as u64;
        }
    }

    /// BLEU in [0, 100], as sacreBLEU reports it.
    pub fn score(&self) -> f64 {
        if self.hypothesis_len == 0 || self.matches.iter().all(|&m| m == 0) {
            return 0.0;
        }
        let brevity = if self.hypothesis_len < self.reference_len {
            (1.0 - self.reference_len as f64 / self.hypothesis_len as f64).exp()
        } else {
            1.0
        };
        let mut log_sum = 0.0;
        let mut smooth = 1.0;
        for n in 0..MAX_ORDER {
            if self.totals[n] == 0 {
                // sacreBLEU stops at the first order without n-grams; the
                // missing precisions count as 0.
                log_sum += (MAX_ORDER - n) as f64 * -9_999_999_999.0;
                break;
            }
            let precision = if self.matches[n] == 0 {
                smooth *= 2.0;
                100.0 / (smooth * self.totals[n] as f64)
            } else {
                100.0 * self.matches[n] as f64 / self.totals[n] as f64
            };
            log_sum += precision.ln();
        }
        brevity * (log_sum / MAX_ORDER as f64).exp()
    }
}

/// The reference length nearest to `hyp_len`, the shorter on ties.
fn closest_length(hyp_len: usize, lengths: impl Iterator<Item = usize>) -> usize {
    lengths.min_by_key(|&len| (len.abs_diff(hyp_len), len)).unwrap_or(0)
}

fn ngram_counts<'a, 'b>(tokens: &'b [&'a str], n: usize) -> HashMap<&'b [&'a str], u64> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU (0 to 100) of `hypotheses` against `references` (one list
/// per hypothesis, of any length), tokenized with [`tokenize_13a`].
pub fn corpus_bleu(hypotheses: &[String], references: &[Vec<String>]) -> f64 {
    assert_eq!(hypotheses.len(), references.len(), "one list of references per hypothesis");
    let mut stats = BleuStats::default();
    for (hypothesis, refs) in hypotheses.iter().zip(references) {
        let hypothesis = tokenize_13a(hypothesis);
        let refs: Vec<String> = refs.iter().map(|r| tokenize_13a(r)).collect();
        let ref_tokens: Vec<Vec<&str>> = refs.iter().map(|r| r.split_whitespace().collect()).collect();
        let hyp_tokens: Vec<&str> = hypothesis.split_whitespace().collect();
        stats.add(&hyp_tokens, &ref_tokens);
    }
    stats.score()
}

/// sacreBLEU's `13a` tokenization (mteval-v13a.pl): unescapes a few XML
/// entities, splits off punctuation and symbols, splits periods and commas
/// except inside numbers, and dashes after digits. Tokens are joined by
/// single spaces.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let chars: Vec<char> = format!(" {line} ").chars().collect();
    // Symbols and punctuation except - . , and the apostrophe.
    let mut spaced = Vec::with_capacity(chars.len() * 2);
    for &c in &chars {
        if is_13a_symbol(c) {
            spaced.extend([' ', c, ' ']);
        } else {
            spaced.push(c);
        }
    }
    let is_digit = |c: char| c.is_ascii_digit();
    let is_period_comma = |c: char| c == '.' || c == ',';
    // ([^0-9])([\.,]) -> "\1 \2 "
    let spaced = substitute_pairs(&spaced, |a, b| !is_digit(a) && is_period_comma(b), |a, b| vec![a, ' ', b, ' ']);
    // ([\.,])([^0-9]) -> " \1 \2"
    let spaced = substitute_pairs(&spaced, |a, b| is_period_comma(a) && !is_digit(b), |a, b| vec![' ', a, ' ', b]);
    // ([0-9])(-) -> "\1 \2 "
    let spaced = substitute_pairs(&spaced, |a, b| is_digit(a) && b == '-', |a, b| vec![a, ' ', b, ' ']);
    let text: String = spaced.into_iter().collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `[\{-\~\[-\` -\&\(-\+\:-\@\/]` of mteval-v13a.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/') && c != ' '
}

/// Python's `re.sub` for a two-character pattern: scans left to right and
/// replaces non-overlapping matches.
fn substitute_pairs(
    chars: &[char],
    matches: impl Fn(char, char) -> bool,
    replace: impl Fn(char, char) -> Vec<char>,
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 2);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && matches(chars[i], chars[i + 1]) {
            out.extend(replace(chars[i], chars[i + 1]));
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}
