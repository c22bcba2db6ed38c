//! Plain-text tables as kubectl prints them: columns left-aligned to their widest cell,
//! three spaces apart, no trailing blanks.

/// Renders `rows` (the header first) as aligned lines, each ending in a newline.
pub fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell_without_trailing_blanks() {
        let rows = [
            ["NAME", "STATUS", "AGE"].map(str::to_owned),
            ["web-v1", "ok", ""].map(str::to_owned),
            ["a", "degraded", "3s"].map(str::to_owned),
        ];
        assert_eq!(
            render(&rows),
            "NAME     STATUS     AGE\nweb-v1   ok\na        degraded   3s\n"
        );
    }
}
