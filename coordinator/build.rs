//! Rebuilds the coordinator when a migration is added or changed: the
//! migrations are embedded in it (`sqlx::migrate!` in `store/mod.rs`), and
//! the macro alone does not tell cargo to watch their folder.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
