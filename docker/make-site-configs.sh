#!/bin/sh
# Write docker/sites/<site>/site.yaml (+ ca.crt and the site key) for docker/compose.yaml.
# In a real deployment each hospital writes its own SITE.yaml; see docs/deployment.md.
set -eu
cd "$(dirname "$0")/.."
for s in site_A site_B site_C site_EXT; do
  role=train; [ "$s" = site_EXT ] && role=external
  mkdir -p "docker/sites/$s"
  cp "pki/sites/$s/ca.crt" "pki/sites/$s/$s.key" "docker/sites/$s/"
  cat > "docker/sites/$s/site.yaml" <<YAML
site: $s
role: $role
task: ki67_ceus
manifest: /data/$s/manifest.csv
coordinator: coordinator:9092
ca_certificate: ca.crt
private_key: $s.key
# the phantom's splits are below the cells policy's minimums (docs/privacy.md); a real site
# keeps the default release policy
disclosure: {mode: exact}
YAML
done
echo "wrote docker/sites/*/site.yaml"
