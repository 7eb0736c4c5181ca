//! Loading: embedded defaults, then a TOML file, then `CONVOY_<SECTION>_<KEY>` environment variables.

use std::path::Path;

use figment::error::Kind;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Num, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use crate::error::ConfigError;
use crate::schema::Config;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "CONVOY_";

/// Name used for the environment in error messages.
const ENVIRONMENT: &str = "environment";

impl Config {
    /// Loads the configuration from `path` (when given) and the process environment, then validates it.
    ///
    /// Without a path the embedded defaults are used as the base. See [`Config::load_with_env`].
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        // `vars()` panics on non-Unicode variables; such variables cannot be ours anyway.
        let env =
            std::env::vars_os().filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
        Self::load_with_env(path, env)
    }

    /// Like [`Config::load`], but reads overrides from `env` instead of the process environment.
    ///
    /// A variable `CONVOY_<SECTION>_<KEY>` sets `<section>.<key>`: the first `_` after the prefix ends the
    /// section name, the rest (lowercased) is the key, so `CONVOY_LIMITS_MAX_FRAME_BYTES` sets
    /// `limits.max_frame_bytes`. List values are written as a TOML array (`["a:1", "b:2"]`) or comma
    /// separated (`a:1,b:2`). Variables whose section is not a configuration section (`CONVOY_CONFIG`,
    /// `CONVOY_LOG_DIR`, ...) are ignored; an unknown key inside a known section is an error.
    pub fn load_with_env<I>(path: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut figment = Figment::new();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            let metadata = Metadata::from("TOML file", Source::File(path.to_path_buf()));
            figment = figment.merge(TomlText { text, metadata });
        }
        figment = figment.merge(EnvOverrides::new(env));
        extract(&figment)
    }

    /// Parses and validates a configuration from TOML text, ignoring the environment.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let metadata = Metadata::named("TOML text");
        extract(&Figment::from(TomlText { text: text.to_owned(), metadata }))
    }

    /// Renders the configuration as TOML that [`Config::from_toml_str`] reads back; unset options are omitted.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("every configuration value has a TOML representation")
    }
}

fn extract(figment: &Figment) -> Result<Config, ConfigError> {
    let config: Config = figment.extract().map_err(|error| parse_error(figment, error))?;
    config.validate()?;
    Ok(config)
}

/// Turns figment's error into a [`ConfigError::Parse`] naming the source and the key.
fn parse_error(figment: &Figment, error: figment::Error) -> ConfigError {
    let mut path = error.path.clone();
    let message = match &error.kind {
        Kind::UnknownField(field, expected) => {
            // The path normally ends with the unknown key already; make sure it does.
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let section = match &path[..path.len() - 1] {
                [] => "at the top level".to_owned(),
                parents => format!("in [{}]", parents.join(".")),
            };
            format!("unknown key; valid keys {section} are: {}", expected.join(", "))
        }
        Kind::UnknownVariant(value, expected) => {
            format!("unknown value {value:?}; expected one of: {}", expected.join(", "))
        }
        kind => kind.to_string().trim_end().to_owned(),
    };
    // Prefer the source of the offending value itself: a section's table merges several sources.
    let metadata = match figment.find_value(&path.join(".")) {
        Ok(value) => figment.get_metadata(value.tag()).or(error.metadata.as_ref()),
        Err(_) => error.metadata.as_ref(),
    };
    let origin = match metadata {
        Some(Metadata { source: Some(Source::File(path)), .. }) => path.display().to_string(),
        Some(metadata) => metadata.name.to_string(),
        None => "configuration".to_owned(),
    };
    let from_env = metadata.is_some_and(|m| m.name == ENVIRONMENT && m.source.is_none());
    let message = match &path[..] {
        [section, key, ..] if from_env => {
            format!("{message} (set by {ENV_PREFIX}{}_{})", section.to_uppercase(), key.to_uppercase())
        }
        _ => message,
    };
    let key = (!path.is_empty()).then(|| path.join("."));
    ConfigError::Parse { origin, key, message }
}

/// TOML text with metadata saying where it came from, so errors can name the file.
struct TomlText {
    text: String,
    metadata: Metadata,
}

impl Provider for TomlText {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(&self.text).data()
    }
}

/// `CONVOY_<SECTION>_<KEY>` variables, taken from an explicit list so tests need not touch the process.
struct EnvOverrides {
    vars: Vec<(String, String)>,
}

/// OpenTelemetry's standard variables and the keys they set. A `CONVOY_TELEMETRY_*`
/// variable for the same key wins.
const OTEL_VARIABLES: &[(&str, &str)] = &[
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "CONVOY_TELEMETRY_OTLP_ENDPOINT"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "CONVOY_TELEMETRY_OTLP_PROTOCOL"),
    ("OTEL_SERVICE_NAME", "CONVOY_TELEMETRY_SERVICE_NAME"),
    ("OTEL_TRACES_SAMPLER_ARG", "CONVOY_TELEMETRY_SAMPLING_RATIO"),
];

impl EnvOverrides {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut ours: Vec<(String, String)> = Vec::new();
        let mut standard: Vec<(String, String)> = Vec::new();
        for (name, value) in vars {
            if name.starts_with(ENV_PREFIX) {
                ours.push((name, value));
            } else if let Some((_, key)) = OTEL_VARIABLES.iter().find(|(otel, _)| *otel == name) {
                standard.push((key.to_string(), value));
            }
        }
        standard.retain(|(key, _)| !ours.iter().any(|(name, _)| name == key));
        let mut vars = ours;
        vars.extend(standard);
        // Deterministic order, so the same environment always produces the same first error.
        vars.sort();
        Self { vars }
    }
}

impl Provider for EnvOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENVIRONMENT)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        // The defaults tell which sections and keys exist and what type each value has.
        let Value::Dict(_, defaults) = Value::serialize(Config::default())? else {
            unreachable!("Config serializes to a table");
        };

        let mut sections: Map<String, Dict> = Map::new();
        for (name, raw) in &self.vars {
            let Some((section, key)) = name.strip_prefix(ENV_PREFIX).and_then(|rest| rest.split_once('_')) else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            let Some(Value::Dict(_, known)) = defaults.get(&section) else { continue };
            let path = format!("{section}.{key}");
            let Some(default) = known.get(&key) else {
                let valid: Vec<&str> = known.keys().map(String::as_str).collect();
                let message = format!("unknown key; valid keys in [{section}] are: {}", valid.join(", "));
                return Err(figment::Error::from(message).with_path(&path));
            };
            let value = env_value(default, raw).map_err(|problem| figment::Error::from(problem).with_path(&path))?;
            sections.entry(section).or_default().insert(key, value);
        }

        let dict = sections.into_iter().map(|(section, keys)| (section, Value::from(keys))).collect();
        Ok(Profile::Default.collect(dict))
    }
}

/// Converts the text of a variable to the type of the key's default value. Text that does not convert is
/// passed through as a string, so deserialization reports the type mismatch against the key.
fn env_value(default: &Value, raw: &str) -> Result<Value, String> {
    let text = Value::from(raw);
    Ok(match default {
        Value::Array(..) => env_list(raw)?,
        Value::Bool(..) => text.to_bool_lossy().map(Value::from).unwrap_or(text),
        Value::Num(_, Num::F32(_) | Num::F64(_)) => raw.trim().parse::<f64>().map(Value::from).unwrap_or(text),
        Value::Num(..) => text.to_num_lossy().map(Value::from).unwrap_or(text),
        _ => text,
    })
}

/// A list: a TOML array (`["a:1", "b:2"]`) or comma separated items (`a:1,b:2`).
fn env_list(raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    if raw.starts_with('[') {
        let table: toml::Table =
            toml::from_str(&format!("list = {raw}")).map_err(|e| format!("not a valid TOML array: {}", e.message()))?;
        Value::serialize(&table["list"]).map_err(|e| e.to_string())
    } else {
        let items: Vec<String> =
            raw.split(',').map(str::trim).filter(|item| !item.is_empty()).map(String::from).collect();
        Ok(Value::from(items))
    }
}
