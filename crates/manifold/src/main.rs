fn main() {
    println!("manifold");
}
