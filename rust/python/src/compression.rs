//! `ferroxy.Compression` into the engine's [`Compression`], once at start-up; errors name the
//! field.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use ferroxy_engine::compression::{Compression, Encoding};

pub fn compression_from(config: &Bound<'_, PyAny>) -> PyResult<Compression> {
    let defaults = Compression::default();
    let field = |name: &str| config.getattr(name);
    let encodings =
        match optional::<Vec<String>>(&field("encodings")?, "encodings", "a list of names")? {
            None => defaults.encodings,
            Some(names) => {
                let mut encodings = Vec::with_capacity(names.len());
                for name in &names {
                    let encoding = Encoding::parse(name).ok_or_else(|| {
                        PyValueError::new_err(format!(
                        "Compression.encodings: {name:?} is not one of \"zstd\", \"br\", \"gzip\""
                    ))
                    })?;
                    if !encodings.contains(&encoding) {
                        encodings.push(encoding);
                    }
                }
                if encodings.is_empty() {
                    return Err(PyValueError::new_err(
                        "Compression.encodings: empty (name at least one, or leave it None)",
                    ));
                }
                encodings
            }
        };
    let types = match optional::<Vec<String>>(&field("types")?, "types", "a list of media types")? {
        None => defaults.types,
        Some(types) => {
            for media in &types {
                let valid = media
                    .split_once('/')
                    .is_some_and(|(family, sub)| !family.is_empty() && !sub.is_empty());
                if !valid {
                    return Err(PyValueError::new_err(format!(
                        "Compression.types: {media:?} is not a media type such as \"text/html\" or \"text/*\""
                    )));
                }
            }
            types.iter().map(|t| t.to_ascii_lowercase()).collect()
        }
    };
    let min_length = match optional::<i64>(&field("min_length")?, "min_length", "an int")? {
        None => defaults.min_length,
        Some(n) => u64::try_from(n)
            .map_err(|_| PyValueError::new_err("Compression.min_length must be >= 0"))?,
    };
    let level = match optional::<i64>(&field("level")?, "level", "an int")? {
        None => None,
        Some(level @ 0..=19) => Some(level as u32),
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "Compression.level must be between 0 and 19 (gzip takes up to 9, brotli 11), got {other}"
            )))
        }
    };
    let decompress = optional::<bool>(&field("decompress")?, "decompress", "a bool")?
        .unwrap_or(defaults.decompress);
    Ok(Compression {
        encodings,
        types,
        min_length,
        level,
        decompress,
    })
}

/// `value` as a `T`, None for None, or a TypeError naming `Compression.name`.
fn optional<'py, T: FromPyObjectOwned<'py>>(
    value: &Bound<'py, PyAny>,
    name: &str,
    must_be: &str,
) -> PyResult<Option<T>> {
    if value.is_none() {
        return Ok(None);
    }
    value
        .extract()
        .map(Some)
        .map_err(|_| PyTypeError::new_err(format!("Compression.{name} must be {must_be} or None")))
}

/// The engine's defaults, for `DEFAULTS["compression"]`.
pub fn defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let defaults = Compression::default();
    let dict = PyDict::new(py);
    let names: Vec<&str> = defaults.encodings.iter().map(|e| e.as_str()).collect();
    dict.set_item("encodings", names)?;
    dict.set_item("types", defaults.types)?;
    dict.set_item("min_length", defaults.min_length)?;
    dict.set_item("decompress", defaults.decompress)?;
    let levels = PyDict::new(py);
    for encoding in [Encoding::Gzip, Encoding::Brotli, Encoding::Zstd] {
        levels.set_item(encoding.as_str(), encoding.default_level())?;
    }
    dict.set_item("levels", levels)?;
    Ok(dict)
}
