#![forbid(unsafe_code)]
//! A small QR Code encoder (ISO/IEC 18004) for `tinyscale up --qr`: the login URL is shown as a
//! QR code in the terminal, like `tailscale up --qr`.
//!
//! Written from the standard, not ported from a library, and deliberately narrow:
//! * byte mode only (8-bit data, one segment, no ECI);
//! * error-correction level M, falling back to L when M cannot hold the payload;
//! * versions 1–10 (21×21 to 57×57 modules): up to 213 bytes at M, 271 at L, which is plenty for
//!   a login URL; anything longer is [`QrError::TooLong`];
//! * Reed–Solomon over GF(2⁸) (polynomial 0x11D), generator polynomials built at run time, block
//!   split and interleaving per the standard's table (stored as two 10-entry rows per level);
//! * all eight data masks are tried and the one with the lowest penalty (rules N1–N4) is kept;
//! * finder, separator, timing and alignment patterns, the dark module, format information
//!   (BCH(15,5), mask 0x5412) and version information (BCH(18,6), versions ≥ 7).
//!
//! Pure: no I/O. [`render_terminal`] turns a symbol into text made of Unicode half blocks.

/// Why a payload could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QrError {
    /// The payload does not fit a version 10 symbol even at level L (more than 271 bytes).
    #[error("data too long for a QR code up to version 10")]
    TooLong,
}

/// A finished QR symbol, without quiet zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrCode {
    /// Width and height in modules: 4 × version + 17.
    pub size: usize,
    /// Row-major module colours, `size × size` of them; `true` is dark.
    pub modules: Vec<bool>,
}

impl QrCode {
    /// Whether the module in column `x`, row `y` is dark; outside the symbol is light.
    pub fn get(&self, x: usize, y: usize) -> bool {
        x < self.size && y < self.size && self.modules.get(y * self.size + x) == Some(&true)
    }
}

/// Error-correction levels, as indices into the tables below.
const L: usize = 0;
const M: usize = 1;
/// ECC codewords per block, versions 1–10, for L and M (ISO/IEC 18004 Table 9).
const ECC_LEN: [[u8; 10]; 2] = [
    [7, 10, 15, 20, 26, 18, 20, 24, 30, 18],
    [10, 16, 26, 18, 24, 16, 18, 22, 22, 26],
];
/// Number of error-correction blocks, versions 1–10, for L and M.
const BLOCKS: [[u8; 10]; 2] = [[1, 1, 1, 1, 1, 2, 2, 2, 2, 4], [1, 1, 1, 2, 2, 4, 4, 4, 5, 5]];

/// Total codewords of a version: the modules left after the function patterns, divided by 8.
fn raw_codewords(ver: usize) -> usize {
    let n = ver / 7 + 2; // alignment pattern positions per axis, from version 2
    let align = if ver >= 2 { (25 * n - 10) * n - 55 } else { 0 };
    let version_info = if ver >= 7 { 36 } else { 0 };
    ((16 * ver + 128) * ver + 64 - align - version_info) / 8
}

fn data_codewords(ver: usize, ecl: usize) -> usize {
    raw_codewords(ver) - usize::from(ECC_LEN[ecl][ver - 1]) * usize::from(BLOCKS[ecl][ver - 1])
}

/// GF(2⁸) multiplication modulo x⁸ + x⁴ + x³ + x² + 1.
fn gf_mul(x: u8, y: u8) -> u8 {
    let mut z: u16 = 0;
    for i in (0..8).rev() {
        z = (z << 1) ^ ((z >> 7) * 0x11D);
        z ^= u16::from((y >> i) & 1) * u16::from(x);
    }
    z as u8
}

/// The `degree` ECC codewords of one block (`degree` ≥ 1): data(x)·x^degree modulo the
/// generator ∏ (x − αⁱ), i < `degree`, built here with its leading 1 omitted.
fn rs_ecc(data: &[u8], degree: usize) -> Vec<u8> {
    let (mut gen, mut r, mut root) = (vec![0u8; degree + 1], vec![0u8; degree + 1], 1u8);
    gen[degree - 1] = 1; // gen[degree] stays 0: it makes `gen[j + 1]` below safe
    for _ in 0..degree {
        for j in 0..degree {
            gen[j] = gf_mul(gen[j], root) ^ gen[j + 1];
        }
        root = gf_mul(root, 2);
    }
    for &b in data {
        let factor = b ^ r[0];
        r.rotate_left(1);
        r[degree] = 0;
        for j in 0..degree {
            r[j] ^= gf_mul(gen[j], factor);
        }
    }
    r.truncate(degree);
    r
}

/// BCH code word: `data` followed by its remainder modulo `gen` (degree `deg`).
fn bch(data: u32, gen: u32, deg: u32) -> u32 {
    let mut r = data;
    for _ in 0..deg {
        r = (r << 1) ^ ((r >> (deg - 1)) * gen);
    }
    data << deg | r
}

/// The 15 format bits for a level and mask: BCH(15,5) with generator 0x537, then XOR 0x5412.
fn format_bits(ecl: usize, mask: usize) -> u32 {
    bch(u32::from(ecl == L) << 3 | mask as u32, 0x537, 10) ^ 0x5412
}

/// The 18 version bits: BCH(18,6) with generator 0x1F25.
fn version_bits(ver: usize) -> u32 {
    bch(ver as u32, 0x1F25, 12)
}

/// Where format bit `i` (0 = least significant) goes, as (x, y) in each of its two copies.
fn format_pos(n: usize, i: usize) -> [(usize, usize); 2] {
    let near = match i {
        0..=5 => (8, i),
        6 | 7 => (8, i + 1),
        8 => (7, 8),
        _ => (14 - i, 8),
    };
    [near, if i < 8 { (n - 1 - i, 8) } else { (8, n - 15 + i) }]
}

/// Data mask condition for column `x`, row `y` (the standard's i = row, j = column).
fn mask_bit(mask: usize, x: usize, y: usize) -> bool {
    match mask {
        0 => (x + y) % 2 == 0,
        1 => y % 2 == 0,
        2 => x % 3 == 0,
        3 => (x + y) % 3 == 0,
        4 => (x / 3 + y / 2) % 2 == 0,
        5 => x * y % 2 + x * y % 3 == 0,
        6 => (x * y % 2 + x * y % 3) % 2 == 0,
        _ => ((x + y) % 2 + x * y % 3) % 2 == 0,
    }
}

/// A symbol under construction: module colours plus which modules are function patterns.
#[derive(Clone)]
struct Grid {
    n: usize,
    m: Vec<bool>,
    func: Vec<bool>,
}

impl Grid {
    fn set(&mut self, x: usize, y: usize, dark: bool) {
        self.m[y * self.n + x] = dark;
        self.func[y * self.n + x] = true;
    }

    fn draw_format(&mut self, bits: u32) {
        for i in 0..15 {
            for (x, y) in format_pos(self.n, i) {
                self.set(x, y, (bits >> i) & 1 == 1);
            }
        }
        self.set(8, self.n - 8, true); // the dark module
    }

    fn draw_function_patterns(&mut self, ver: usize) {
        let n = self.n;
        for i in 0..n {
            self.set(6, i, i % 2 == 0);
            self.set(i, 6, i % 2 == 0);
        }
        // Finder patterns with their light separators.
        for (cx, cy) in [(3, 3), (n - 4, 3), (3, n - 4)] {
            for (dx, dy) in (0..81).map(|d| (d % 9, d / 9)) {
                let (x, y) = ((cx + dx).wrapping_sub(4), (cy + dy).wrapping_sub(4));
                let d = dx.abs_diff(4).max(dy.abs_diff(4));
                if x < n && y < n {
                    self.set(x, y, d != 2 && d != 4);
                }
            }
        }
        // Alignment patterns: centres at 6, the last at n − 7, one midway from version 7 (≤ 13).
        let last = n - 7;
        let pos: &[usize] = match ver {
            1 => &[],
            2..=6 => &[6, last],
            _ => &[6, (6 + last) / 2, last],
        };
        for &ay in pos {
            for &ax in pos {
                if (ax == 6 && (ay == 6 || ay == last)) || (ax == last && ay == 6) {
                    continue; // would overlap a finder pattern
                }
                for (dx, dy) in (0..25).map(|d| (d % 5, d / 5)) {
                    self.set(ax + dx - 2, ay + dy - 2, dx.abs_diff(2).max(dy.abs_diff(2)) != 1);
                }
            }
        }
        self.draw_format(0); // reserve; the real bits go in once the mask is chosen
        if ver >= 7 {
            let bits = version_bits(ver);
            for i in 0..18 {
                let (a, b, dark) = (n - 11 + i % 3, i / 3, (bits >> i) & 1 == 1);
                self.set(a, b, dark);
                self.set(b, a, dark);
            }
        }
    }

    /// Places codewords in the two-column zigzag, right to left, skipping the timing column.
    fn draw_codewords(&mut self, cw: &[u8]) {
        let (n, total, mut i) = (self.n, cw.len() * 8, 0);
        // Column pairs n−1..n−2 down to 1..0, shifted left by one past the timing column 6.
        for right in (2..n).rev().step_by(2).map(|r| if r <= 6 { r - 1 } else { r }) {
            for vert in 0..n {
                let y = if (right + 1) & 2 == 0 { n - 1 - vert } else { vert };
                for x in [right, right - 1] {
                    let k = y * n + x;
                    if !self.func[k] && i < total {
                        self.m[k] = (cw[i >> 3] >> (7 - (i & 7))) & 1 == 1;
                        i += 1;
                    }
                }
            }
        }
    }

    /// Penalty score, rules N1 (runs), N2 (2×2 blocks), N3 (finder-like 1:1:3:1:1 with four
    /// light modules on one side; outside the symbol counts as light) and N4 (dark balance).
    fn penalty(&self) -> usize {
        let (n, m) = (self.n, &self.m);
        let mut p = 0;
        for line in 0..n {
            for column in [false, true] {
                let get = |k: usize| if column { m[k * n + line] } else { m[line * n + k] };
                let (mut run, mut window) = (0, 0u16);
                for k in 0..n + 4 {
                    let dark = k < n && get(k);
                    if k < n {
                        run = if k > 0 && dark == get(k - 1) { run + 1 } else { 1 };
                        p += [0, 0, 0, 0, 0, 3, 1][run.min(6)];
                    }
                    window = (window << 1 | u16::from(dark)) & 0x7FF;
                    p += 40 * usize::from(window == 0b000_0101_1101 || window == 0b101_1101_0000);
                }
            }
        }
        for k in (0..n * (n - 1)).filter(|k| k % n < n - 1) {
            let c = m[k];
            p += 3 * usize::from(c == m[k + 1] && c == m[k + n] && c == m[k + n + 1]);
        }
        let dark = m.iter().filter(|&&d| d).count();
        p + 10 * ((dark * 20).abs_diff(n * n * 10) / (n * n))
    }
}

/// Encodes `data` in byte mode into the smallest version (1–10) at level M, or at level L when
/// no version holds it at M.
pub fn encode(data: &[u8]) -> Result<QrCode, QrError> {
    let (ver, ecl) = [M, L]
        .into_iter()
        .flat_map(|e| (1..=10).map(move |v| (v, e)))
        .find(|&(v, e)| 1 + usize::from(v >= 10) + data.len() < data_codewords(v, e)) // see below
        .ok_or(QrError::TooLong)?;

    // Mode 0100, count (1 byte, 2 from version 10), data, terminator 0000: byte data shifted right
    // by one nibble, so one codeword more than count + data. Then 0xEC 0x11 pad codewords.
    let mut seg = (data.len() as u16).to_be_bytes()[usize::from(ver < 10)..].to_vec(); // ≤ 230 below v10
    seg.extend_from_slice(data);
    let shifted = seg.iter().chain(&[0]).zip(std::iter::once(&0x4).chain(&seg));
    let mut cw: Vec<u8> = shifted.map(|(&lo, &hi)| hi << 4 | lo >> 4).collect();
    let pad = [0xEC, 0x11].into_iter().cycle();
    cw.extend(pad.take(data_codewords(ver, ecl) - cw.len()));

    // Split into blocks (short ones first, long ones one data codeword longer), add ECC, then
    // interleave: the i-th data codeword of every block, then the i-th ECC codeword of every block.
    let (nblocks, ecc_len) = (usize::from(BLOCKS[ecl][ver - 1]), usize::from(ECC_LEN[ecl][ver - 1]));
    let raw = raw_codewords(ver);
    let (short_len, nshort) = (raw / nblocks - ecc_len, nblocks - raw % nblocks);
    let mut blocks = Vec::with_capacity(nblocks);
    let mut rest = &cw[..];
    for b in 0..nblocks {
        let (block, tail) = rest.split_at(short_len + usize::from(b >= nshort));
        blocks.push((block, rs_ecc(block, ecc_len)));
        rest = tail;
    }
    let data_cols = (0..=short_len).flat_map(|i| blocks.iter().filter_map(move |(d, _)| d.get(i)));
    let ecc_cols = (0..ecc_len).flat_map(|i| blocks.iter().filter_map(move |(_, e)| e.get(i)));
    let out: Vec<u8> = data_cols.chain(ecc_cols).copied().collect();

    let n = 4 * ver + 17;
    let (m, func) = (vec![false; n * n], vec![false; n * n]);
    let mut grid = Grid { n, m, func };
    grid.draw_function_patterns(ver);
    grid.draw_codewords(&out);
    let masked = (0..8).map(|mask| {
        let mut g = grid.clone();
        for k in 0..n * n {
            g.m[k] ^= !g.func[k] && mask_bit(mask, k % n, k / n);
        }
        g.draw_format(format_bits(ecl, mask));
        g
    });
    let modules = masked.min_by_key(Grid::penalty).map_or(grid.m, |g| g.m);
    Ok(QrCode { size: n, modules })
}

/// Draws `code` with Unicode half blocks, two module rows per text line, with a 2-module quiet
/// zone; every line ends in `'\n'`.
///
/// Polarity: the glyphs paint the *light* modules (and the quiet zone) in the terminal's
/// foreground colour and dark modules are left blank, as go-qrcode's `ToSmallString(false)` does.
/// On the usual light-text-on-dark-background terminal this shows dark modules on a light field,
/// as scanners expect; on a dark-on-light terminal the symbol comes out inverted (many phone
/// scanners still read that).
pub fn render_terminal(code: &QrCode) -> String {
    const QUIET: usize = 2;
    let w = code.size + 2 * QUIET;
    let light = |x: usize, y: usize| y < w && !code.get(x.wrapping_sub(QUIET), y.wrapping_sub(QUIET));
    let mut s = String::with_capacity((w + 1) * w.div_ceil(2) * 3);
    for y in (0..w).step_by(2) {
        s.extend((0..w).map(|x| [' ', '▄', '▀', '█'][usize::from(light(x, y)) * 2 + usize::from(light(x, y + 1))]));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::process::Command;

    #[test]
    fn reed_solomon_matches_the_standards_01234567_example() {
        // ISO/IEC 18004 Annex I: "01234567" in numeric mode, version 1-M.
        let mut data = vec![0x10, 0x20, 0x0C, 0x56, 0x61, 0x80];
        data.extend([0xEC, 0x11].repeat(5));
        let ecc = [0xA5, 0x24, 0xD4, 0xC1, 0xED, 0x36, 0xC7, 0x87, 0x2C, 0x55];
        assert_eq!(rs_ecc(&data, 10), ecc);
    }

    #[test]
    fn format_and_version_bits_match_the_standard() {
        // Annex C worked example: level M, mask 101.
        assert_eq!(format_bits(M, 5), 0b100_0000_1100_1110);
        let l = [0x77C4, 0x72F3, 0x7DAA, 0x789D, 0x662F, 0x6318, 0x6C41, 0x6976];
        let m = [0x5412, 0x5125, 0x5E7C, 0x5B4B, 0x45F9, 0x40CE, 0x4F97, 0x4AA0];
        assert_eq!((0..8).map(|k| format_bits(L, k)).collect::<Vec<_>>(), l);
        assert_eq!((0..8).map(|k| format_bits(M, k)).collect::<Vec<_>>(), m);
        // Annex D: version information for versions 7-10.
        assert_eq!([7, 8, 9, 10].map(version_bits), [0x07C94, 0x085BC, 0x09A99, 0x0A4D3]);
    }

    #[test]
    fn picks_the_smallest_version_at_m_then_l() {
        let m_caps = [14, 26, 42, 62, 84, 106, 122, 152, 180, 213];
        for (v, &cap) in (1..).zip(&m_caps) {
            assert_eq!(encode(&vec![b'a'; cap]).map(|c| c.size), Ok(4 * v + 17), "{cap} bytes");
            assert_eq!(read_format(&encode(&vec![b'a'; cap]).unwrap()).0, M);
        }
        // Too long for 10-M: the smallest version at L (9-L holds 230 bytes, 10-L 271).
        for (len, size) in [(214, 53), (230, 53), (231, 57), (271, 57)] {
            let code = encode(&vec![b'a'; len]).unwrap();
            assert_eq!((code.size, read_format(&code).0), (size, L), "{len} bytes");
        }
        assert_eq!(encode(&[0; 272]), Err(QrError::TooLong));
        assert_eq!(encode(&[]).map(|c| c.size), Ok(21));
    }

    /// Reads (level, mask) from both format-information copies, checking they agree.
    fn read_format(c: &QrCode) -> (usize, usize) {
        let pos = |copy: usize| (0..15).rev().map(move |i| format_pos(c.size, i)[copy]);
        let word = |copy| pos(copy).fold(0, |w, (x, y)| w << 1 | u32::from(c.get(x, y)));
        assert_eq!(word(0), word(1));
        let found = (0..16).find(|&k| format_bits(k / 8, k % 8) == word(0));
        found.map(|k| (k / 8, k % 8)).expect("valid format information")
    }

    fn check_structure(c: &QrCode) {
        let (n, ver) = (c.size, (c.size - 17) / 4);
        // Finder patterns and their separators: each corner's 8×8 region.
        for (ox, oy) in [(0, 0), (n - 8, 0), (0, n - 8)] {
            let (fx, fy) = (usize::from(ox > 0), usize::from(oy > 0));
            for (x, y) in (0..64).map(|d: usize| (d % 8, d / 8)) {
                let (dx, dy) = (x.wrapping_sub(fx), y.wrapping_sub(fy));
                let want = dx < 7 && dy < 7 && dx.abs_diff(3).max(dy.abs_diff(3)) != 2;
                assert_eq!(c.get(ox + x, oy + y), want, "finder near ({ox},{oy})");
            }
        }
        for i in 8..n - 8 {
            assert_eq!((c.get(i, 6), c.get(6, i)), (i % 2 == 0, i % 2 == 0), "timing at {i}");
        }
        assert!(c.get(8, 4 * ver + 9), "dark module");
        read_format(c);
        if ver >= 7 {
            for i in 0..18 {
                let bit = (version_bits(ver) >> i) & 1 == 1;
                assert_eq!((c.get(n - 11 + i % 3, i / 3), c.get(i / 3, n - 11 + i % 3)), (bit, bit));
            }
        }
        if ver >= 2 {
            let ok = c.get(n - 7, n - 7) && !c.get(n - 8, n - 7) && c.get(n - 9, n - 9);
            assert!(ok, "bottom-right alignment pattern");
        }
    }

    /// A coordinator login URL (55 bytes: version 4-M).
    const URL: &str = "http://127.0.0.1:8080/register/0123456789abcdef01234567";

    /// Short text, the login URL, a 150-byte URL, and payloads filling every version 1-10 at M
    /// plus two at L (240 and 271 bytes).
    fn samples() -> Vec<String> {
        let url150 = format!("https://login.example.com/a/{}", "0123456789abcdef".repeat(8))[..150].to_string();
        let mut v = vec!["hi".to_string(), URL.to_string(), url150];
        for len in [14, 26, 42, 62, 84, 106, 122, 152, 180, 213, 240, 271] {
            v.push((0..len).map(|i| char::from(b'!' + (i * 7 % 90) as u8)).collect());
        }
        v
    }

    #[test]
    fn structure_of_every_version() {
        for s in samples() {
            check_structure(&encode(s.as_bytes()).unwrap());
        }
    }

    #[test]
    fn terminal_rendering_matches_the_modules() {
        let c = encode(URL.as_bytes()).unwrap();
        let text = render_terminal(&c);
        let w = c.size + 4;
        let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
        assert_eq!(lines.len(), w.div_ceil(2));
        for (y, line) in (0..w).map(|y| (y, &lines[y / 2])) {
            for (x, &ch) in line.iter().enumerate() {
                let light = [if y % 2 == 0 { '▀' } else { '▄' }, '█'].contains(&ch);
                assert_eq!(light, !c.get(x.wrapping_sub(2), y.wrapping_sub(2)), "({x},{y})");
            }
        }
        assert!(text.ends_with('\n') && lines.iter().all(|l| l.len() == w));
    }

    /// Decodes `code` with zbarimg from a PGM (×4, 4-module quiet zone); `None` if not installed.
    fn zbar_decode(code: &QrCode, tag: usize) -> Option<String> {
        Command::new("zbarimg").arg("--version").output().ok()?;
        let w = (code.size + 8) * 4;
        let mut img = format!("P5\n{w} {w}\n255\n").into_bytes();
        img.extend(
            (0..w * w).map(|k| 255 * u8::from(!code.get((k % w / 4).wrapping_sub(4), (k / w / 4).wrapping_sub(4)))),
        );
        let path = std::env::temp_dir().join(format!("tinyscale-qr-{}-{tag}.pgm", std::process::id()));
        std::fs::write(&path, img).unwrap();
        let out = Command::new("zbarimg").arg("--raw").arg(&path).output();
        let _ = std::fs::remove_file(&path);
        let out = out.unwrap();
        Some(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string())
    }

    #[test]
    fn zbarimg_decodes_what_we_encode() {
        for (i, s) in samples().iter().enumerate() {
            let Some(decoded) = zbar_decode(&encode(s.as_bytes()).unwrap(), i) else {
                let required = std::env::var("TINYSCALE_REQUIRE_ZBAR").as_deref() == Ok("1");
                assert!(!required, "TINYSCALE_REQUIRE_ZBAR=1 but zbarimg is not installed");
                eprintln!("skipping QR decode round-trip: zbarimg not installed (apt-get install zbar-tools)");
                return;
            };
            assert_eq!(&decoded, s, "length {}", s.len());
        }
    }

    proptest! {
        #[test]
        fn encode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..=300)) {
            let r = encode(&data);
            prop_assert_eq!(r.is_ok(), data.len() <= 271);
            if let Ok(c) = r {
                prop_assert_eq!(c.modules.len(), c.size * c.size);
                render_terminal(&c);
            }
        }
    }
}
