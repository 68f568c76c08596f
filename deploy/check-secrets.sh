#!/bin/sh
# Run by compose's `secrets` service before anything else starts (and by the tests): every
# secret must be set, at least 24 characters, and not the example's placeholder.
# Generate one with: openssl rand -hex 32
status=0
for name in REDIS_PASSWORD FLOWER_PASSWORD GRAFANA_ADMIN_PASSWORD; do
    eval "value=\${$name:-}"
    case "$value" in
        "") echo "$name is not set: put it in .env (openssl rand -hex 32)" >&2; status=1 ;;
        *change-me*) echo "$name is still the example's placeholder: set your own in .env (openssl rand -hex 32)" >&2; status=1 ;;
        *)
            if [ "${#value}" -lt 24 ]; then
                echo "$name is ${#value} characters: use at least 24 (openssl rand -hex 32)" >&2
                status=1
            fi ;;
    esac
done
# The gateway serves /v1 without keys unless API_KEYS_FILE names them: only on loopback.
case "${BIND_ADDRESS:-127.0.0.1}" in
    127.0.0.1|localhost|::1) ;;
    *)
        if [ -z "${API_KEYS_FILE:-}" ]; then
            echo "BIND_ADDRESS=$BIND_ADDRESS would publish the gateway without API keys: set API_KEYS_FILE in .env (a file of batchery serve --new-key lines)" >&2
            status=1
        fi ;;
esac
[ "$status" -eq 0 ] && echo "secrets: every one set, none an example"
exit "$status"
