//! The plugin's configuration.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;

/// The configuration the operator gave the pool's plugin: a JSON object, `{}` when none was set.
///
/// In the proxy config it is written as TOML
/// (`strategy = { plugin = "x.wasm", config = { header = "x-canary" } }`); the host hands it
/// over as JSON. Read it with the typed getters, which treat a key of the wrong type as an
/// error rather than as absent (so a typo in the operator's config is reported, not ignored),
/// or deserialize it whole with [`Config::deserialize`].
///
/// ```
/// use sluice_sdk::Config;
/// let config = Config::from_json(r#"{"header": "x-beta", "weight": 3}"#).unwrap();
/// assert_eq!(config.get_str("header").unwrap(), Some("x-beta"));
/// assert_eq!(config.get_u64("weight").unwrap(), Some(3));
/// assert_eq!(config.get_u64("missing").unwrap(), None);
/// assert!(config.get_u64("header").is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    map: Map<String, Value>,
}

/// Why a configuration was rejected. Converts into `String`, so `?` works in
/// [`Strategy::init`](crate::Strategy::init).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    key: Option<String>,
    message: String,
}

impl ConfigError {
    /// An error about `key`, e.g. a value out of the range the strategy accepts.
    pub fn for_key(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }

    /// An error about the configuration as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            key: None,
            message: message.into(),
        }
    }

    /// The key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "config key `{key}`: {}", self.message),
            None => write!(f, "config: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for String {
    fn from(e: ConfigError) -> String {
        e.to_string()
    }
}

impl Config {
    /// Parses a configuration; it must be a JSON object.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::from_slice(text.as_bytes())
    }

    /// Parses a configuration from UTF-8 JSON bytes, as the host sends it.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ConfigError> {
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(map)) => Ok(Config { map }),
            Ok(_) => Err(ConfigError::new("expected a JSON object")),
            Err(e) => Err(ConfigError::new(format!("invalid JSON: {e}"))),
        }
    }

    /// `true` if no key is set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// The whole configuration as a JSON object.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// The string at `key`; `Ok(None)` if absent or `null`, `Err` if it is not a string.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        self.typed(key, "a string", Value::as_str)
    }

    /// The non-negative integer at `key`; `Ok(None)` if absent or `null`.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// The integer at `key`; `Ok(None)` if absent or `null`.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        self.typed(key, "an integer", Value::as_i64)
    }

    /// The number at `key` (integers are accepted); `Ok(None)` if absent or `null`.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// The boolean at `key`; `Ok(None)` if absent or `null`.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.typed(key, "a boolean", Value::as_bool)
    }

    /// Fails naming the first key not in `allowed`, so a misspelt option is refused at load time
    /// instead of silently falling back to a default.
    pub fn reject_unknown_keys(&self, allowed: &[&str]) -> Result<(), ConfigError> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) if allowed.is_empty() => Err(ConfigError::for_key(
                k,
                "unknown key; this plugin takes no configuration",
            )),
            Some(k) => Err(ConfigError::for_key(
                k,
                format!("unknown key; expected one of: {}", allowed.join(", ")),
            )),
        }
    }

    /// Deserializes the whole configuration into `T` with serde.
    ///
    /// Derive `Deserialize` through the re-exported serde with
    /// `#[serde(crate = "sluice_sdk::serde")]` if your crate does not depend on serde itself;
    /// `#[serde(deny_unknown_fields)]` rejects misspelt keys.
    ///
    /// ```
    /// use sluice_sdk::serde::Deserialize;
    ///
    /// #[derive(Deserialize)]
    /// #[serde(crate = "sluice_sdk::serde", deny_unknown_fields)]
    /// struct Settings {
    ///     #[serde(default = "default_slots")]
    ///     slots: u32,
    /// }
    /// fn default_slots() -> u32 { 8 }
    ///
    /// let config = sluice_sdk::Config::from_json("{}").unwrap();
    /// assert_eq!(config.deserialize::<Settings>().unwrap().slots, 8);
    /// ```
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        // `Map` → `Value` needs an owned value; configs are tiny and this runs once per instance.
        T::deserialize(Value::Object(self.map.clone())).map_err(|e| ConfigError::new(e.to_string()))
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        get: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => get(v)
                .map(Some)
                .ok_or_else(|| ConfigError::for_key(key, format!("expected {expected}, got {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_getters() {
        let c = Config::from_json(r#"{"s": "x", "u": 7, "i": -3, "f": 1.5, "b": true, "n": null}"#)
            .unwrap();
        assert_eq!(c.get_str("s").unwrap(), Some("x"));
        assert_eq!(c.get_u64("u").unwrap(), Some(7));
        assert_eq!(c.get_i64("i").unwrap(), Some(-3));
        assert_eq!(c.get_f64("f").unwrap(), Some(1.5));
        assert_eq!(c.get_f64("u").unwrap(), Some(7.0));
        assert_eq!(c.get_bool("b").unwrap(), Some(true));
        assert_eq!(c.get_str("n").unwrap(), None);
        assert_eq!(c.get_str("absent").unwrap(), None);
        assert!(!c.is_empty());
    }

    #[test]
    fn wrong_type_is_an_error_naming_the_key() {
        let c = Config::from_json(r#"{"u": -1, "s": 5}"#).unwrap();
        let e = c.get_u64("u").unwrap_err();
        assert_eq!(e.key(), Some("u"));
        assert_eq!(
            e.to_string(),
            "config key `u`: expected a non-negative integer, got -1"
        );
        let as_string: String = c.get_str("s").unwrap_err().into();
        assert!(as_string.contains("`s`"), "{as_string}");
    }

    #[test]
    fn must_be_an_object() {
        assert!(Config::from_json("[1]").is_err());
        assert!(Config::from_json("{")
            .unwrap_err()
            .to_string()
            .contains("invalid JSON"));
        assert!(Config::from_json("{}").unwrap().is_empty());
    }

    #[test]
    fn unknown_keys() {
        let c = Config::from_json(r#"{"header": "a", "hedaer": "b"}"#).unwrap();
        let e = c.reject_unknown_keys(&["header"]).unwrap_err();
        assert_eq!(e.key(), Some("hedaer"));
        assert!(Config::default().reject_unknown_keys(&[]).is_ok());
        let e = c.reject_unknown_keys(&[]).unwrap_err();
        assert!(e.to_string().contains("takes no configuration"), "{e}");
    }

    #[test]
    fn deserialize_with_serde() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct S {
            header: String,
            #[serde(default)]
            value: Option<String>,
        }
        let c = Config::from_json(r#"{"header": "x"}"#).unwrap();
        assert_eq!(
            c.deserialize::<S>().unwrap(),
            S {
                header: "x".into(),
                value: None
            }
        );
        let bad = Config::from_json(r#"{"header": "x", "extra": 1}"#).unwrap();
        assert!(bad.deserialize::<S>().is_err());
    }
}
