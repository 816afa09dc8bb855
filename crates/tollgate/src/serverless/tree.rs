//! `serverless.yml` as a tree whose every node knows where it is in the user's file. Variables are
//! resolved on it ([`super::vars`]), then the typed structs of [`super`] are read from it with serde
//! ([`Located::read`]), so an error, from a variable or from a field's type, points into the file the
//! user wrote.

use std::fmt;

use serde::Deserialize;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor,
};
use serde_saphyr::{Location, Spanned};

/// A node and where it is written (for a resolved variable: where the variable is used).
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub node: Node,
    pub at: Location,
}

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Text that environment variables gave, and how tollgate's config writes it (`${NAME}`).
    Env(String, String),
    Seq(Vec<Located>),
    /// Entries in file order: each key, where it is written, its value.
    Map(Vec<(String, Location, Located)>),
}

impl Located {
    /// The entry `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Located> {
        match &self.node {
            Node::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    /// The node at `path` below this one, if there is one.
    pub fn find(&self, path: &[Step]) -> Option<&Located> {
        path.iter()
            .try_fold(self, |at, step| match (step, &at.node) {
                (Step::Key(k), _) => at.get(k),
                (Step::Index(i), Node::Seq(items)) => items.get(*i),
                _ => None,
            })
    }

    /// Reads the typed value `T` from this node; `path` names it in errors.
    pub fn read<T: DeserializeOwned>(&self, path: &FieldPath) -> Result<T, ReadError> {
        T::deserialize(At {
            node: self,
            path: path.clone(),
        })
    }
}

/// One step down a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Where a value is in the document, as field names print it: `functions.f.events[0].http`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Step>);

impl FieldPath {
    /// This path, one key further.
    pub fn key(&self, key: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Step::Key(key.to_string()));
        p
    }

    /// This path, one index further.
    pub fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Step::Index(i));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(k) if n == 0 => write!(f, "{k}")?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

// ---- reading the tree from YAML, every node with its location ----

impl<'de> Deserialize<'de> for Located {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Node>::deserialize(d)?;
        Ok(Located {
            node: spanned.value,
            at: spanned.referenced,
        })
    }
}

/// A mapping key: YAML allows numbers and booleans there too.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Node::deserialize(d)? {
            Node::Str(s) | Node::Env(s, _) => Ok(Key(s)),
            Node::Int(i) => Ok(Key(i.to_string())),
            Node::Float(f) => Ok(Key(f.to_string())),
            Node::Bool(b) => Ok(Key(b.to_string())),
            Node::Null => Ok(Key("null".into())),
            Node::Seq(_) | Node::Map(_) => Err(de::Error::custom(
                "a mapping key must be text, not a list or a mapping",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Node, E> {
        Ok(Node::Int(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Node, E> {
        Ok(i64::try_from(u).map_or(Node::Float(u as f64), Node::Int))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Node, E> {
        Ok(Node::Float(f))
    }
    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::Str(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Node, E> {
        Ok(Node::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Located>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Key>>()? {
            let value = map.next_value::<Located>()?;
            entries.push((key.value.0, key.referenced, value));
        }
        Ok(Node::Map(entries))
    }
}

// ---- reading typed values from the tree ----

/// A typed read that failed, and where.
#[derive(Debug)]
pub struct ReadError {
    pub message: String,
    pub path: FieldPath,
    pub at: Location,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReadError {}

impl de::Error for ReadError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ReadError {
            message: msg.to_string(),
            path: FieldPath::default(),
            at: Location::UNKNOWN,
        }
    }
}

impl ReadError {
    /// The innermost node an error comes from is where it is reported.
    fn or_at(mut self, path: &FieldPath, at: Location) -> Self {
        if self.at == Location::UNKNOWN {
            self.at = at;
            self.path = path.clone();
        }
        self
    }
}

/// A node being read, and its path.
struct At<'a> {
    node: &'a Located,
    path: FieldPath,
}

impl<'de> Deserializer<'de> for At<'_> {
    type Error = ReadError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ReadError> {
        let Located { node, at } = self.node;
        let read = match node {
            Node::Null => v.visit_unit(),
            Node::Bool(b) => v.visit_bool(*b),
            Node::Int(i) => v.visit_i64(*i),
            Node::Float(f) => v.visit_f64(*f),
            Node::Str(s) | Node::Env(s, _) => v.visit_str(s),
            Node::Seq(items) => v.visit_seq(Items {
                items: items.iter().enumerate(),
                path: &self.path,
            }),
            Node::Map(entries) => v.visit_map(Entries {
                entries: entries.iter(),
                value: None,
                path: &self.path,
            }),
        };
        read.map_err(|e| e.or_at(&self.path, *at))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ReadError> {
        match self.node.node {
            Node::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

struct Items<'a, I> {
    items: I,
    path: &'a FieldPath,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a Located)>> SeqAccess<'de> for Items<'a, I> {
    type Error = ReadError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ReadError> {
        match self.items.next() {
            Some((i, node)) => seed
                .deserialize(At {
                    node,
                    path: self.path.index(i),
                })
                .map(Some),
            None => Ok(None),
        }
    }
}

struct Entries<'a, I> {
    entries: I,
    value: Option<(&'a str, &'a Located)>,
    path: &'a FieldPath,
}

impl<'de, 'a, I: Iterator<Item = &'a (String, Location, Located)>> MapAccess<'de>
    for Entries<'a, I>
{
    type Error = ReadError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ReadError> {
        let Some((key, key_at, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some((key, value));
        // An unknown field is reported where its key is written.
        seed.deserialize(de::value::StrDeserializer::<ReadError>::new(key))
            .map(Some)
            .map_err(|e| e.or_at(&self.path.key(key), *key_at))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ReadError> {
        let (key, node) = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a value was asked for before its key"))?;
        seed.deserialize(At {
            node,
            path: self.path.key(key),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        limit: u32,
        #[serde(default)]
        names: Vec<String>,
    }

    fn tree(yaml: &str) -> Located {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn every_node_knows_its_place() {
        let t = tree("a:\n  - x\n  - { b: 2 }\n");
        let b = t
            .find(&[Step::Key("a".into()), Step::Index(1), Step::Key("b".into())])
            .unwrap();
        assert_eq!(
            (b.node.clone(), b.at.line(), b.at.column()),
            (Node::Int(2), 3, 10)
        );
    }

    #[test]
    fn typed_reads_report_the_innermost_place() {
        let t = tree("top:\n  limit: 10\n  names: [a, b]\n");
        let ok: Limits = t
            .get("top")
            .unwrap()
            .read(&FieldPath::default().key("top"))
            .unwrap();
        assert_eq!(
            ok,
            Limits {
                limit: 10,
                names: vec!["a".into(), "b".into()]
            }
        );

        let t = tree("top:\n  limit: 10\n  names: [a, [b]]\n");
        let e = t
            .get("top")
            .unwrap()
            .read::<Limits>(&FieldPath::default().key("top"))
            .unwrap_err();
        assert_eq!(
            (e.path.to_string(), e.at.line(), e.at.column()),
            ("top.names[1]".into(), 3, 14)
        );

        let t = tree("top:\n  limit: 10\n  nmes: [a]\n");
        let e = t
            .get("top")
            .unwrap()
            .read::<Limits>(&FieldPath::default().key("top"))
            .unwrap_err();
        assert!(e.message.contains("unknown field `nmes`"), "{e}");
        assert_eq!(
            (e.path.to_string(), e.at.line(), e.at.column()),
            ("top.nmes".into(), 3, 3)
        );

        let t = tree("top:\n  names: []\n");
        let e = t
            .get("top")
            .unwrap()
            .read::<Limits>(&FieldPath::default().key("top"))
            .unwrap_err();
        assert!(e.message.contains("missing field `limit`"), "{e}");
        assert_eq!((e.path.to_string(), e.at.line()), ("top".into(), 2));
    }
}
