//! The Serverless Framework's variables that tollgate resolves: `${env:X}`, `${opt:stage}`,
//! `${sls:stage}`, `${self:a.b}`, quoted and numeric literals, and `, fallback` lists. A resolved
//! value is placed where the variable is used, so later errors about it point there.

use std::path::Path;

use serde_saphyr::Location;

use super::tree::{FieldPath, Located, Node, Step};
use crate::config::ConfigError;
use crate::config::raw::{escape_env, is_env_name};

/// How deep `${self:…}` references may nest (a cycle would not end).
const MAX_DEPTH: usize = 16;

/// What variables resolve against.
pub struct Vars<'a> {
    pub file: &'a Path,
    /// The document as written.
    pub root: &'a Located,
    /// `--stage`.
    pub opt_stage: Option<&'a str>,
    /// The stage, once known (`${sls:stage}` cannot be used before).
    pub stage: Option<String>,
}

impl Vars<'_> {
    fn err(&self, at: Location, path: &FieldPath, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.file, at, path.to_string(), message)
    }

    /// `v` with every variable in it resolved.
    pub fn resolve(&self, v: &Located, path: &FieldPath) -> Result<Located, ConfigError> {
        self.resolve_at(v, path, 0)
    }

    fn resolve_at(
        &self,
        v: &Located,
        path: &FieldPath,
        depth: usize,
    ) -> Result<Located, ConfigError> {
        if depth > MAX_DEPTH {
            return Err(self.err(v.at, path, "variables nest too deeply (a ${self:…} cycle?)"));
        }
        let node = match &v.node {
            Node::Str(s) => return self.resolve_string(s, v.at, path, depth),
            Node::Seq(items) => Node::Seq(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.resolve_at(x, &path.index(i), depth))
                    .collect::<Result<_, _>>()?,
            ),
            Node::Map(entries) => Node::Map(
                entries
                    .iter()
                    .map(|(k, k_at, x)| {
                        Ok((k.clone(), *k_at, self.resolve_at(x, &path.key(k), depth)?))
                    })
                    .collect::<Result<_, ConfigError>>()?,
            ),
            other => other.clone(),
        };
        Ok(Located { node, at: v.at })
    }

    /// `s` with its variables resolved. Text that an environment variable gave becomes a
    /// [`Node::Env`], which remembers how tollgate's own config writes it.
    fn resolve_string(
        &self,
        s: &str,
        at: Location,
        path: &FieldPath,
        depth: usize,
    ) -> Result<Located, ConfigError> {
        let sited = |node| Located { node, at };
        // The resolved text, and its template while one can be written (`None` once a piece makes
        // it ambiguous).
        let (mut value, mut written) = (String::new(), Some(String::new()));
        let mut literal = String::new();
        let mut from_env = false;
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            let end = closing_brace(rest, start)
                .ok_or_else(|| self.err(at, path, format!("unterminated variable in {s:?}")))?;
            let whole = &rest[start..=end];
            let found = self.expression(&rest[start + 2..end], whole, at, path, depth)?;
            if start == 0 && end == s.len() - 1 && rest.len() == s.len() {
                // The whole string is one variable: the value keeps its type (number, mapping, …).
                return Ok(sited(found.node));
            }
            literal.push_str(&rest[..start]);
            let inserted = match found.node {
                Node::Str(t) => t,
                Node::Env(t, template) => {
                    from_env = true;
                    // `$` then `${X}` would read back as the literal `${X}`.
                    written = written
                        .filter(|_| !literal.ends_with('$'))
                        .map(|w| w + &escape_env(&literal) + &template);
                    value.push_str(&literal);
                    literal.clear();
                    value.push_str(&t);
                    rest = &rest[end + 1..];
                    continue;
                }
                Node::Int(n) => n.to_string(),
                Node::Float(n) => n.to_string(),
                Node::Bool(b) => b.to_string(),
                _ => {
                    return Err(self.err(
                        at,
                        path,
                        format!("{whole} is not text and cannot be part of {s:?}"),
                    ));
                }
            };
            literal.push_str(&inserted);
            rest = &rest[end + 1..];
        }
        literal.push_str(rest);
        value.push_str(&literal);
        Ok(sited(match written {
            Some(w) if from_env => Node::Env(value, w + &escape_env(&literal)),
            _ => Node::Str(value),
        }))
    }

    /// One `${…}`: the first of its comma-separated sources that has a value.
    fn expression(
        &self,
        expr: &str,
        whole: &str,
        at: Location,
        path: &FieldPath,
        depth: usize,
    ) -> Result<Located, ConfigError> {
        let text = |t: &str| {
            Some(Located {
                node: Node::Str(t.to_string()),
                at,
            })
        };
        let mut missing = Vec::new();
        for source in split_top_level(expr) {
            let source = source.trim();
            let found = if source.starts_with("${") {
                Some(self.resolve_string(source, at, path, depth + 1)?)
            } else if let Some(lit) = quoted(source) {
                text(lit)
            } else if let Ok(n) = source.parse::<i64>() {
                Some(Located {
                    node: Node::Int(n),
                    at,
                })
            } else if let Ok(n) = source.parse::<f64>() {
                Some(Located {
                    node: Node::Float(n),
                    at,
                })
            } else if source == "opt:stage" {
                self.opt_stage.and_then(text)
            } else if source == "sls:stage" {
                match &self.stage {
                    Some(stage) => text(stage),
                    None => {
                        return Err(self.err(at, path, "provider.stage cannot use ${sls:stage}"));
                    }
                }
            } else if let Some(name) = source.strip_prefix("env:") {
                let name = name.trim();
                let v = std::env::var(name).ok();
                if v.is_none() {
                    missing.push(format!("environment variable {name} is not set"));
                }
                // Names tollgate's config can write as `${NAME}` stay variables there.
                v.map(|v| Located {
                    node: if is_env_name(name) {
                        Node::Env(v, format!("${{{name}}}"))
                    } else {
                        Node::Str(v)
                    },
                    at,
                })
            } else if let Some(target) = source.strip_prefix("self:") {
                let steps: Vec<Step> = target
                    .trim()
                    .split('.')
                    .filter(|p| !p.is_empty())
                    .map(|p| Step::Key(p.to_string()))
                    .collect();
                match self.root.find(&steps) {
                    None
                    | Some(Located {
                        node: Node::Null, ..
                    }) => {
                        missing.push(format!("{} is not in the file", target.trim()));
                        None
                    }
                    Some(found) => Some(self.resolve_at(found, &FieldPath(steps), depth + 1)?),
                }
            } else if source.starts_with("opt:") {
                None
            } else {
                return Err(self.err(
                    at,
                    path,
                    format!(
                        "unsupported variable {whole}: tollgate resolves ${{env:…}}, ${{opt:stage}}, ${{sls:stage}} and ${{self:…}}"
                    ),
                ));
            };
            if let Some(v) = found.filter(|v| v.node != Node::Null) {
                return Ok(v);
            }
        }
        let why = if missing.is_empty() {
            String::new()
        } else {
            format!(" ({})", missing.join("; "))
        };
        Err(self.err(at, path, format!("variable {whole} has no value{why}")))
    }
}

/// Index of the `}` closing the `${` at `start`.
fn closing_brace(s: &str, start: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(start + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits on commas outside quotes and nested `${…}`.
fn split_top_level(expr: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut from) = (0usize, None, 0);
    for (i, c) in expr.char_indices() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('{', None) => depth += 1,
            ('}', None) => depth = depth.saturating_sub(1),
            (',', None) if depth == 0 => {
                parts.push(&expr[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&expr[from..]);
    parts
}

fn quoted(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    (b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0])
        .then(|| &s[1..s.len() - 1])
}
