//! Sizes on the command line, as rsync reads them: `65536`, `64K`, `16M`, `1.5G`, `4MiB` (units
//! of 1024), `4MB` (units of 1000); the unit's letter in either case.

/// Parse a size in bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?}: expected a size like 65536, 64K, 16M or 1.5G");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(scale)
            .ok_or_else(|| format!("{s:?}: too large"));
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let bytes = (n * scale as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?}: too large"));
    }
    Ok(bytes as u64)
}

/// Parse a size in bytes that must fit 32 bits (chunk sizes).
pub fn parse_size_u32(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?}: at most 4G"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_rsync() {
        for (s, n) in [
            ("65536", 65536),
            ("64K", 65536),
            ("64k", 65536),
            ("16M", 16 << 20),
            ("16MiB", 16 << 20),
            ("4MB", 4_000_000),
            ("1.5G", 3 << 29),
            ("1g", 1 << 30),
            ("0", 0),
            ("512b", 512),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in ["", "M", "16Q", "-1", "1.2.3K", "16 M", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_size_u32("4M"), Ok(4 << 20));
        // --window's default, as written in its argument.
        assert_eq!(
            parse_size("16M"),
            Ok(hop_engine::net::NetOptions::default().window)
        );
        assert!(parse_size_u32("4G").unwrap_err().contains("at most"));
    }
}
