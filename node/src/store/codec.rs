//! How values are laid out on disk: a format version byte, then bincode 2 (serde mode).
//! Decoding never panics: a value from another version, or corrupt bytes, is an error
//! that names what could not be read.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// Bumped whenever a stored type changes shape.
pub const FORMAT_VERSION: u8 = 1;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, config()).expect("writing into a Vec cannot fail");
    out
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => {
            let (value, used) = bincode::serde::decode_from_slice(rest, config())
                .map_err(|e| StoreError::Corrupt { what, detail: e.to_string() })?;
            if used != rest.len() {
                return Err(StoreError::Corrupt { what, detail: format!("{} trailing bytes", rest.len() - used) });
            }
            Ok(value)
        }
        Some((v, _)) => {
            Err(StoreError::Corrupt { what, detail: format!("format version {v}, this build reads {FORMAT_VERSION}") })
        }
        None => Err(StoreError::Corrupt { what, detail: "empty value".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let v = (7u64, "seven".to_string(), Some(vec![1u8, 2]));
        assert_eq!(decode::<(u64, String, Option<Vec<u8>>)>("t", &encode(&v)).unwrap(), v);
        assert!(decode::<u64>("t", &[]).is_err());
        assert!(decode::<u64>("t", &[9, 1]).is_err());
        assert!(decode::<String>("t", &[FORMAT_VERSION, 200, 1]).is_err());
        let mut long = encode(&1u8);
        long.push(0);
        assert!(decode::<u8>("t", &long).is_err());
    }
}
