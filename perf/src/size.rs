//! Byte sizes on the command line: `4096`, `4k`, `128K`, `1M`, `2G`, `1GiB`, `512B`.

/// Parse a size with an optional binary suffix (k/K = 1024, m/M, g/G, t/T; an optional
/// trailing `B` or `iB`). Zero and overflow are errors.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("bad size {s:?}: expected a number with an optional k/M/G/T suffix (e.g. 4k, 128K, 1M)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}: number too large"))?;
    let suffix = suffix.trim();
    let unit = suffix.strip_suffix("iB").or_else(|| suffix.strip_suffix("ib")).unwrap_or(suffix);
    let unit = if unit.len() > 1 { unit.strip_suffix(['B', 'b']).unwrap_or(unit) } else { unit };
    let mult: u64 = match unit {
        "" | "B" | "b" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        _ => return Err(format!("bad size {s:?}: unknown unit {suffix:?} (use k, M, G or T)")),
    };
    let v = n.checked_mul(mult).ok_or_else(|| format!("bad size {s:?}: too large"))?;
    if v == 0 {
        return Err(format!("bad size {s:?}: must be greater than zero"));
    }
    Ok(v)
}

/// Human form of a byte count, for headers ("4 KiB", "2.00 GiB").
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4KB"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        for bad in ["", "k", "0", "4x", "-4k", "1.5M", "99999999999999999999", "16777216T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(3 << 29), "1.50 GiB");
    }
}
