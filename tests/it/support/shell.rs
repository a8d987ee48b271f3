//! Curl command lines typed as users type them: a whole `curl …` line, with
//! shell quoting and `\` line continuations, run against the gateway.
//!
//! ```ignore
//! let sh = Shell::at(&gw).set("SERVICE_TOKEN", &token);
//! let (status, body) = sh
//!     .run("curl -X GET https://service_token:SERVICE_TOKEN@localhost:PORT/v1/version")
//!     .await;
//! ```
//!
//! `HOST` stands for the gateway's `127.0.0.1:PORT` and `PORT` for its port;
//! [`Shell::set`] adds placeholders of one's own (the seed documents' own
//! `API_KEY`, `<service_token>`, …). A placeholder is replaced only where it
//! stands alone, not inside a longer word. `-k` is implied, as the seed
//! documents tell users to pass it for the self-signed certificate.

use super::Gateway;

/// What a user types into: placeholders to fill in, then curl.
pub struct Shell {
    vars: Vec<(String, String)>,
}

impl Shell {
    /// A shell pointed at `gw`: `HOST` and `PORT` are set.
    pub fn at(gw: &Gateway) -> Self {
        let port = gw.running().addr.port();
        Shell {
            vars: vec![
                ("HOST".to_owned(), format!("127.0.0.1:{port}")),
                ("PORT".to_owned(), port.to_string()),
            ],
        }
    }

    /// `name` in a command line stands for `value` from now on.
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The words `line` stands for, placeholders filled in.
    pub fn words(&self, line: &str) -> Vec<String> {
        split(line).into_iter().map(|word| self.fill(&word)).collect()
    }

    /// Runs `line` (`curl …`); returns (status, body).
    pub async fn run(&self, line: &str) -> (u16, String) {
        let words = self.words(line);
        let (program, args) = words.split_first().expect("an empty command line");
        assert_eq!(program, "curl", "not a curl line: {line}");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        super::curl(&args).await
    }

    fn fill(&self, word: &str) -> String {
        let part_of_a_word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let mut out = String::with_capacity(word.len());
        let mut at = 0;
        'scan: while let Some(c) = word[at..].chars().next() {
            if !part_of_a_word(word[..at].chars().next_back()) {
                for (name, value) in &self.vars {
                    let end = at + name.len();
                    if word[at..].starts_with(name.as_str()) && !part_of_a_word(word[end..].chars().next()) {
                        out.push_str(value);
                        at = end;
                        continue 'scan;
                    }
                }
            }
            out.push(c);
            at += c.len_utf8();
        }
        out
    }
}

/// Splits a command line into words as a POSIX shell does for these lines:
/// `'…'` literal, `"…"` with `\"`, `\\`, `\$` and `` \` `` escapes, `\`
/// newline continues the line, `\x` elsewhere is `x`.
fn split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                words.extend(word.take());
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => panic!("unclosed ' in: {line}"),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('\n') => {}
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => panic!("unclosed \" in: {line}"),
                        },
                        Some(c) => w.push(c),
                        None => panic!("unclosed \" in: {line}"),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => panic!("a command line ending in \\: {line}"),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

#[test]
fn splits_and_fills_like_a_shell() {
    let line = r#"curl -X GET -H 'Authorization: Bearer SERVICE_TOKEN' \
     -H "Content-Type: application/json" -d '{
    "user": "admin"
  }' https://service_token:SERVICE_TOKEN@localhost:PORT/v1/version "a\"b" ''"#;
    let sh = Shell {
        vars: vec![
            ("PORT".to_owned(), "8443".to_owned()),
            ("SERVICE_TOKEN".to_owned(), "glsa_x".to_owned()),
            ("TOKEN".to_owned(), "wrong".to_owned()),
        ],
    };
    assert_eq!(
        sh.words(line),
        [
            "curl",
            "-X",
            "GET",
            "-H",
            "Authorization: Bearer glsa_x",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{\n    \"user\": \"admin\"\n  }",
            "https://service_token:glsa_x@localhost:8443/v1/version",
            "a\"b",
            "",
        ]
    );
    // Only whole placeholders: not inside a longer word.
    assert_eq!(
        sh.words("PORTS xPORT PORT_ PORT"),
        ["PORTS", "xPORT", "PORT_", "8443"]
    );
}
