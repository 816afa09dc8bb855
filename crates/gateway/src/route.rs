//! Request routing: base path to (api, stage), then path template and method to a route.
//!
//! Within an API, resources form a trie of path segments. A literal segment beats a `{param}`, which
//! beats a greedy `{proxy+}`, as in AWS; an exact method beats `ANY`. Matching borrows the request path
//! and allocates nothing.

use http::Method;

use crate::config::{Api, RouteMethod};

/// Where a request landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the API in the config.
    pub api: usize,
    /// Index of the stage within the API.
    pub stage: usize,
    /// Index of the route within the API.
    pub route: usize,
    /// Where, in the routed path, the part after the stage's base path starts (that part is empty
    /// or starts with `/`).
    pub rest_start: usize,
}

impl RouteMatch {
    /// The part of `path` (the one routed) after the stage's base path.
    pub fn rest<'p>(&self, path: &'p str) -> &'p str {
        path.get(self.rest_start..).unwrap_or("")
    }
}

#[derive(Debug, Default)]
struct Methods {
    exact: Vec<(Method, usize)>,
    any: Option<usize>,
}

impl Methods {
    fn find(&self, method: &Method) -> Option<usize> {
        self.exact
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, r)| *r)
            .or(self.any)
    }

    fn insert(&mut self, method: &RouteMethod, route: usize) -> bool {
        match method {
            RouteMethod::Any => self.any.replace(route).is_none(),
            RouteMethod::Only(m) => {
                if self.exact.iter().any(|(e, _)| e == m) {
                    return false;
                }
                self.exact.push((m.clone(), route));
                true
            }
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    literals: Vec<(Box<str>, Node)>,
    param: Option<Box<Node>>,
    greedy: Option<Methods>,
    methods: Methods,
}

impl Node {
    /// `rest` is the remaining path without its leading `/`; empty at the resource itself.
    fn find(&self, rest: &str, method: &Method) -> Option<usize> {
        if rest.is_empty() {
            return self.methods.find(method);
        }
        let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some((_, child)) = self.literals.iter().find(|(lit, _)| **lit == *first) {
            if let Some(r) = child.find(tail, method) {
                return Some(r);
            }
        }
        if let Some(child) = self.param.as_ref().filter(|_| !first.is_empty()) {
            if let Some(r) = child.find(tail, method) {
                return Some(r);
            }
        }
        self.greedy.as_ref().and_then(|g| g.find(method))
    }
}

/// Why a route table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Two routes with the same path and method.
    #[error("duplicate route {method} {path}")]
    Duplicate {
        /// The path template.
        path: String,
        /// The method.
        method: String,
    },
    /// A malformed path template.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path template.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two stages claim the same base path.
    #[error("base path {0:?} is used by more than one stage")]
    DuplicateBasePath(String),
}

/// Checks a path template: starts with `/`, no empty segments, `{name}` parameters, a greedy
/// `{name+}` only as the last segment.
pub fn validate_template(path: &str) -> Result<(), RouteError> {
    let bad = |reason| {
        Err(RouteError::InvalidPath {
            path: path.to_string(),
            reason,
        })
    };
    let Some(rest) = path.strip_prefix('/') else {
        return bad("must start with /");
    };
    if rest.is_empty() {
        return Ok(());
    }
    let segments: Vec<&str> = rest.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return bad("empty path segment");
        }
        if let Some(inner) = seg.strip_prefix('{') {
            let Some(name) = inner.strip_suffix('}') else {
                return bad("a parameter must be a whole segment, like {id}");
            };
            let name = name.strip_suffix('+').unwrap_or(name);
            if name.is_empty() || name.contains(['{', '}', '+']) {
                return bad("invalid parameter name");
            }
            if inner.ends_with("+}") && i + 1 != segments.len() {
                return bad("a greedy parameter {name+} must be the last segment");
            }
        } else if seg.contains(['{', '}']) {
            return bad("a parameter must be a whole segment, like {id}");
        }
    }
    Ok(())
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    // A trailing slash addresses the same resource: "/a/" is "/a".
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    trimmed.split('/').filter(|s| !s.is_empty())
}

/// The routing table of all APIs and stages.
#[derive(Debug, Default)]
pub struct Router {
    /// (base path without trailing slash, api, stage), longest first.
    bases: Vec<(Box<str>, usize, usize)>,
    trees: Vec<Node>,
}

impl Router {
    /// Builds the table; fails on duplicate routes or base paths and malformed templates.
    pub fn new(apis: &[Api]) -> Result<Self, RouteError> {
        let mut bases: Vec<(Box<str>, usize, usize)> = Vec::new();
        let mut trees = Vec::with_capacity(apis.len());
        for (a, api) in apis.iter().enumerate() {
            for (s, stage) in api.stages.iter().enumerate() {
                let base = stage.base_path.trim_end_matches('/');
                if bases.iter().any(|(b, _, _)| **b == *base) {
                    return Err(RouteError::DuplicateBasePath(stage.base_path.clone()));
                }
                bases.push((base.into(), a, s));
            }
            let mut root = Node::default();
            for (r, route) in api.routes.iter().enumerate() {
                validate_template(&route.path)?;
                let mut node = &mut root;
                let mut greedy = false;
                for seg in segments(&route.path) {
                    if seg.ends_with("+}") {
                        greedy = true;
                        break;
                    }
                    node = if seg.starts_with('{') {
                        node.param.get_or_insert_with(Box::default)
                    } else {
                        let at = match node.literals.iter().position(|(l, _)| **l == *seg) {
                            Some(at) => at,
                            None => {
                                node.literals.push((seg.into(), Node::default()));
                                node.literals.len() - 1
                            }
                        };
                        &mut node.literals[at].1
                    };
                }
                let methods = if greedy {
                    node.greedy.get_or_insert_with(Methods::default)
                } else {
                    &mut node.methods
                };
                if !methods.insert(&route.method, r) {
                    return Err(RouteError::Duplicate {
                        path: route.path.clone(),
                        method: route.method.as_str().to_string(),
                    });
                }
            }
            trees.push(root);
        }
        bases.sort_by_key(|(b, _, _)| std::cmp::Reverse(b.len()));
        Ok(Self { bases, trees })
    }

    /// How many segments the longest base path `path` starts with has (0 when none does): the stage a
    /// request addresses before its dot segments are resolved.
    pub fn base_depth(&self, path: &[u8]) -> usize {
        self.bases
            .iter()
            .find(|(base, _, _)| {
                path.strip_prefix(base.as_bytes())
                    .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
            })
            .map_or(0, |(base, _, _)| crate::path::depth(base))
    }

    /// Finds the route for `method` and `path` (the request path, without query).
    pub fn route(&self, method: &Method, path: &str) -> Option<RouteMatch> {
        for (base, api, stage) in &self.bases {
            let Some(rest) = path.strip_prefix(&**base) else {
                continue;
            };
            if !(rest.is_empty() || rest.starts_with('/')) {
                continue;
            }
            let trimmed = rest.trim_start_matches('/');
            // A trailing slash addresses the same resource: "/a/" is "/a".
            let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
            return self.trees[*api]
                .find(trimmed, method)
                .map(|route| RouteMatch {
                    api: *api,
                    stage: *stage,
                    route,
                    rest_start: base.len(),
                });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Integration, Route, Stage};

    fn api(id: &str, stages: &[(&str, &str)], routes: &[(&str, &str)]) -> Api {
        Api {
            id: id.into(),
            stages: stages
                .iter()
                .map(|(name, base)| Stage {
                    name: (*name).into(),
                    base_path: (*base).into(),
                    throttle: None,
                    method_throttle: Default::default(),
                })
                .collect(),
            routes: routes
                .iter()
                .map(|(method, path)| Route {
                    path: (*path).into(),
                    method: if *method == "ANY" {
                        RouteMethod::Any
                    } else {
                        RouteMethod::Only(method.parse().unwrap())
                    },
                    api_key_required: false,
                    cors: None,
                    allow_get_body: false,
                    authorizer: None,
                    cost: 1,
                    integration: Integration::Http {
                        url: "http://u".parse().unwrap(),
                        timeout: Duration::from_secs(1),
                        tls: None,
                    },
                })
                .collect(),
            allow_encoded_slashes: false,
        }
    }

    fn hit(r: &Router, method: &str, path: &str) -> Option<(usize, usize, usize, String)> {
        r.route(&method.parse().unwrap(), path)
            .map(|m| (m.api, m.stage, m.route, m.rest(path).to_string()))
    }

    #[test]
    fn literal_beats_param_beats_greedy_and_exact_beats_any() {
        let r = Router::new(&[api(
            "w",
            &[("prod", "/prod")],
            &[
                ("PUT", "/registrations/{id}/warranty"),
                ("GET", "/registrations/latest/warranty"),
                ("ANY", "/registrations/{id}/warranty"),
                ("GET", "/files/{path+}"),
                ("GET", "/"),
            ],
        )])
        .unwrap();
        assert_eq!(
            hit(&r, "PUT", "/prod/registrations/42/warranty"),
            Some((0, 0, 0, "/registrations/42/warranty".into()))
        );
        assert_eq!(
            hit(&r, "GET", "/prod/registrations/latest/warranty").map(|h| h.2),
            Some(1)
        );
        assert_eq!(
            hit(&r, "PUT", "/prod/registrations/latest/warranty").map(|h| h.2),
            Some(0)
        );
        assert_eq!(
            hit(&r, "DELETE", "/prod/registrations/7/warranty").map(|h| h.2),
            Some(2)
        );
        assert_eq!(hit(&r, "GET", "/prod/files/a/b/c").map(|h| h.2), Some(3));
        assert_eq!(
            hit(&r, "GET", "/prod/files"),
            None,
            "a greedy parameter needs one segment"
        );
        assert_eq!(hit(&r, "GET", "/prod"), Some((0, 0, 4, String::new())));
        assert_eq!(hit(&r, "GET", "/prod/").map(|h| h.2), Some(4));
        assert_eq!(
            hit(&r, "GET", "/prod/registrations/42/warranty/").map(|h| h.2),
            Some(2)
        );
        assert_eq!(
            hit(&r, "GET", "/production/registrations/42/warranty"),
            None
        );
        assert_eq!(hit(&r, "GET", "/dev/registrations/42/warranty"), None);
        assert_eq!(hit(&r, "POST", "/prod/nothing"), None);
    }

    #[test]
    fn base_paths_pick_api_and_stage_longest_first() {
        let r = Router::new(&[
            api("a", &[("prod", "/prod"), ("edge", "/")], &[("GET", "/x")]),
            api("b", &[("v2", "/prod/v2")], &[("GET", "/x")]),
        ])
        .unwrap();
        assert_eq!(hit(&r, "GET", "/prod/x").map(|h| (h.0, h.1)), Some((0, 0)));
        assert_eq!(hit(&r, "GET", "/x").map(|h| (h.0, h.1)), Some((0, 1)));
        assert_eq!(
            hit(&r, "GET", "/prod/v2/x").map(|h| (h.0, h.1)),
            Some((1, 0))
        );
        assert_eq!(r.base_depth(b"/prod/v2/../x"), 2);
        assert_eq!(r.base_depth(b"/prod/../x"), 1);
        assert_eq!(r.base_depth(b"/production"), 0);
    }

    #[test]
    fn rejects_bad_tables() {
        assert!(matches!(
            Router::new(&[api(
                "a",
                &[("p", "/p")],
                &[("GET", "/x/{id}"), ("GET", "/x/{other}")]
            )]),
            Err(RouteError::Duplicate { .. })
        ));
        assert!(matches!(
            Router::new(&[api("a", &[("p", "/p"), ("q", "/p/")], &[])]),
            Err(RouteError::DuplicateBasePath(_))
        ));
        for bad in ["x", "/a//b", "/{proxy+}/x", "/a{id}", "/{}"] {
            assert!(validate_template(bad).is_err(), "{bad}");
        }
        for good in ["/", "/a", "/a/{id}", "/a/{proxy+}"] {
            assert!(validate_template(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn deep_and_odd_paths() {
        let r = Router::new(&[api("a", &[("p", "/p")], &[("GET", "/{x+}")])]).unwrap();
        let deep = format!("/p{}", "/s".repeat(10_000));
        assert_eq!(hit(&r, "GET", &deep).map(|h| h.2), Some(0));
        assert_eq!(hit(&r, "GET", "/p//"), None);
    }
}
