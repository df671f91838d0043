#!/bin/sh
# Create fedlora's keys on the operator's machine and load what the cluster needs into it.
#
#   deploy/k8s/pki.sh                        # PKI in ./fedlora-pki, 3 devices, namespace fedlora
#   PKI=/secure/fedlora DEVICES=5 NAMESPACE=fedlora deploy/k8s/pki.sh
#
# Needs `fedlora` (scripts/install.sh) and `kubectl` pointed at the cluster. Idempotent:
# existing keys are kept, registering a device again is a no-op, and the Secrets and
# ConfigMaps are re-applied. Run it again after adding devices (DEVICES=N, then scale the
# device StatefulSet to N): the coordinator re-reads the registry ConfigMap without a restart.
#
# $PKI is a coordinator data directory that never runs a coordinator: it keeps the CA key,
# which stays on this machine, and the audit log of the keys it registers and revokes
# ($PKI/audit.jsonl). Into the cluster go:
#   Secret    fedlora-coordinator-tls  ca.crt, server.crt, server.key, operator.pub
#   ConfigMap fedlora-device-registry  devices.json (device ids and public keys)
#   ConfigMap fedlora-ca               ca.crt (what devices and `fedlora run` trust)
#   Secret    fedlora-operator-key     operator.key: only the `fedlora run` Job mounts it;
#                                      whoever can read it can start and stop runs
#   Secret    fedlora-device-keys      device-<i>.key: only because this trial fleet runs in
#                                      the cluster; a real device keeps its key to itself
set -eu

PKI="${PKI:-./fedlora-pki}"
DEVICES="${DEVICES:-3}"
NAMESPACE="${NAMESPACE:-fedlora}"
KEYS="$PKI/device-keys"

# The names devices and `fedlora run` use to reach the coordinator's Service, plus
# localhost for `kubectl port-forward`. For devices outside the cluster, run this
# `fedlora keys init` yourself first with their name for the coordinator added (--host
# coord.example.org); the script keeps an existing PKI.
if [ ! -f "$PKI/tls/ca.crt" ]; then
  fedlora keys init --data-dir "$PKI" \
    --host coordinator \
    --host "coordinator.$NAMESPACE" \
    --host "coordinator.$NAMESPACE.svc" \
    --host "coordinator.$NAMESPACE.svc.cluster.local" \
    --host localhost --host 127.0.0.1
fi

i=0
while [ "$i" -lt "$DEVICES" ]; do
  if [ ! -f "$KEYS/device-$i.key" ]; then
    fedlora keys device --out "$KEYS" --device-id "device-$i"
  fi
  fedlora keys register --data-dir "$PKI" --device-id "device-$i" --public-key "$KEYS/device-$i.pub"
  i=$((i + 1))
done
fedlora keys list --data-dir "$PKI"

apply() { kubectl apply -n "$NAMESPACE" -f -; }

kubectl get namespace "$NAMESPACE" >/dev/null 2>&1 || kubectl create namespace "$NAMESPACE"
kubectl create secret generic fedlora-coordinator-tls -n "$NAMESPACE" \
  --from-file=ca.crt="$PKI/tls/ca.crt" \
  --from-file=server.crt="$PKI/tls/server.crt" \
  --from-file=server.key="$PKI/tls/server.key" \
  --from-file=operator.pub="$PKI/tls/operator.pub" \
  --dry-run=client -o yaml | apply
kubectl create configmap fedlora-device-registry -n "$NAMESPACE" \
  --from-file=devices.json="$PKI/registry/devices.json" \
  --dry-run=client -o yaml | apply
kubectl create configmap fedlora-ca -n "$NAMESPACE" \
  --from-file=ca.crt="$PKI/tls/ca.crt" \
  --dry-run=client -o yaml | apply
kubectl create secret generic fedlora-operator-key -n "$NAMESPACE" \
  --from-file=operator.key="$PKI/tls/operator.key" \
  --dry-run=client -o yaml | apply

set --
i=0
while [ "$i" -lt "$DEVICES" ]; do
  set -- "$@" "--from-file=device-$i.key=$KEYS/device-$i.key"
  i=$((i + 1))
done
kubectl create secret generic fedlora-device-keys -n "$NAMESPACE" "$@" \
  --dry-run=client -o yaml | apply

echo "pki: keys in $PKI (keep ca.key there); cluster objects in $NAMESPACE"
