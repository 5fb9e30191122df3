# Sourced by the 1500-step run scripts: target names to transfer_grid.py's --targets, in the order given.
# DATA (default ../shared/data) is where the Parquet datasets live.
declare -A TARGET_PATHS=([cub]="${DATA:-../shared/data}/cub200_2011_first50_32"
                         [cifar10]="${DATA:-../shared/data}/cifar10_32:50"
                         [omniglot]="${DATA:-../shared/data}/omniglot_bg_small_32")

# target_specs cub,omniglot  ->  cub=PATH,omniglot=PATH (exits with a clear error on an unknown name)
target_specs() {
  local specs="" name
  for name in ${1//,/ }; do
    [[ -n "${TARGET_PATHS[$name]:-}" ]] || { echo "TARGETS names cub, cifar10 or omniglot, got '$name'" >&2; exit 2; }
    specs+="${specs:+,}$name=${TARGET_PATHS[$name]}"
  done
  echo "$specs"
}
