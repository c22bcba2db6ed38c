# Commands that are not a plain cargo invocation. The tests remain `cargo test --workspace`.

.PHONY: images images-test node-test demo

# The proxy and operator images from the Dockerfile, with buildah (no daemon, no
# registry); cached when nothing changed. See docs/images.md.
images:
	images/build

# Builds the images (cached) and checks them: image config, binaries run from each
# image's file system, the injected init container in a network namespace, archives.
images-test:
	cargo test -p weft-e2e --test images --locked -- --ignored

# Weft on the test bed's real node (root; the images from `make images`): helm install,
# then every end-to-end scenario with real pods and traffic, on one node. See
# docs/testbed.md. WEFT_MESH_SCENARIOS=mtls,policy runs only those scenarios.
node-test: images
	cargo test -p weft-e2e --test mesh --locked -- --ignored --nocapture

# The demo a newcomer runs first (docs/demo.md): the images (cached), the kubectl plugin,
# then the demo on the test bed's node (needs root), or on the cluster in KUBECONFIG.
# The node stays up for exploring: `cargo run -p weft-e2e --bin weft-testbed -- down`.
demo:
	images/build
	cargo build -p kubectl-weft
	cargo run -p weft-e2e --bin weft-demo
