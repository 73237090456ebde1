//! The wsrelay operator binary.
fn main() {
    print!("{}", wsrelay_operator::api::crd_yaml());
}
