#!/usr/bin/env bash
# The container image of the seed paper's experiment: a Debian bookworm root filesystem (from
# Debian's own packages, debootstrap) with Apache 2.4 + mod_php + WordPress and MariaDB, set up
# for two runc containers (db and web) that share it read-only; their state (MariaDB's datadir,
# WordPress's wp-content, everything in memory) lives in their bundles and moves with them.
#
#   bash scripts/paper-rootfs.sh [DIR]      (default .cache/paper/rootfs; built once)
#
# Needs root and Debian's package mirror (apt's). About 3 minutes and 850 MB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-$PWD/.cache/paper/rootfs}
PKGS=apache2,libapache2-mod-php,php-mysql,mariadb-server,mariadb-client,wordpress,wordpress-theme-twentytwentythree
if [ "$(cat "$R/.hop-paper-ready" 2>/dev/null)" = "$PKGS" ]; then
    echo "rootfs ready: $R"
    exit 0
fi
if [ -e "$R/.hop-paper-ready" ]; then
    # Built with another package list: install what is missing inside it.
    echo "adding packages to $R"
    mv "$R" "$R.partial"
    chroot "$R.partial" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends ${PKGS//,/ } >"$R.log" 2>&1 ||
        { tail -n 20 "$R.log"; echo "apt-get in the rootfs failed; log: $R.log" >&2; exit 1; }
fi
command -v debootstrap >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
}
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mkdir -p "$(dirname "$R")"
# A partial tree whose debootstrap completed (it removes its own /debootstrap) is configured,
# not fetched again.
if ! [ -x "$R.partial/usr/sbin/mariadbd" ] || [ -e "$R.partial/debootstrap" ]; then
    rm -rf "$R.partial"
    echo "debootstrap bookworm into $R (from ${mirror:-http://deb.debian.org/debian})"
    debootstrap --variant=minbase --include="$PKGS" bookworm "$R.partial" "${mirror:-http://deb.debian.org/debian}" >"$R.log" 2>&1 ||
        { tail -n 20 "$R.log"; echo "debootstrap failed; log: $R.log" >&2; exit 1; }
fi
P=$R.partial
rm -f "$P"/var/cache/apt/archives/*.deb
# The themes live in /usr/share; WordPress looks in its content directory.
for t in "$P"/usr/share/wordpress/wp-content/themes/*/; do
    [ -d "$t" ] && ln -sfn "/usr/share/wordpress/wp-content/themes/$(basename "$t")" \
        "$P/var/lib/wordpress/wp-content/themes/$(basename "$t")"
done

# WordPress: one configuration whatever the Host header (clients come through HAProxy), the
# database on the same host (both containers share the site's network), no cron requests to
# itself, and comments from one load generator accepted as fast as it posts them.
cat >"$P/etc/wordpress/config-default.php" <<'EOF'
<?php
define('DB_NAME', 'wordpress');
define('DB_USER', 'wordpress');
define('DB_PASSWORD', 'hop-paper-experiment');
define('DB_HOST', '127.0.0.1');
define('WP_CONTENT_DIR', '/var/lib/wordpress/wp-content');
define('DISABLE_WP_CRON', true);
define('AUTOMATIC_UPDATER_DISABLED', true);
EOF
mkdir -p "$P/var/lib/wordpress/wp-content/mu-plugins"
cat >"$P/var/lib/wordpress/wp-content/mu-plugins/hop-load.php" <<'EOF'
<?php
// The experiment's writer posts a comment every 200 ms from one address.
add_filter('comment_flood_filter', '__return_false');
add_filter('duplicate_comment_id', '__return_false');
add_filter('pre_comment_approved', function () { return 1; });
EOF

# Apache: WordPress at /, prefork sized for a 2-core VM (the paper's source had 2 vCPUs), no
# idle keep-alive connections left open across a checkpoint.
# Port 8080: the containers' root has no say over privileged ports of the site's network.
echo "Listen 8080" >"$P/etc/apache2/ports.conf"
cat >"$P/etc/apache2/sites-available/000-default.conf" <<'EOF'
<VirtualHost *:8080>
    DocumentRoot /usr/share/wordpress
    <Directory /usr/share/wordpress>
        Options FollowSymLinks
        AllowOverride Limit Options FileInfo
        Require all granted
    </Directory>
    <Directory /var/lib/wordpress/wp-content>
        Options FollowSymLinks
        Require all granted
    </Directory>
    Alias /wp-content /var/lib/wordpress/wp-content
    ErrorLog /dev/null
    CustomLog /dev/null combined
</VirtualHost>
EOF
cat >"$P/etc/apache2/mods-available/mpm_prefork.conf" <<'EOF'
<IfModule mpm_prefork_module>
    StartServers            4
    MinSpareServers         2
    MaxSpareServers         6
    ServerLimit            12
    MaxRequestWorkers      12
    MaxConnectionsPerChild  0
</IfModule>
EOF
sed -i 's/^KeepAlive On/KeepAlive Off/' "$P/etc/apache2/apache2.conf"
echo "ServerName web" >>"$P/etc/apache2/apache2.conf"

# MariaDB: TCP on loopback for WordPress, no native AIO (io_uring and AIO rings cannot be
# checkpointed), a small buffer pool.
cat >"$P/etc/mysql/mariadb.conf.d/99-hop.cnf" <<'EOF'
[mysqld]
bind-address = 127.0.0.1
port = 3306
innodb_use_native_aio = 0
innodb_buffer_pool_size = 64M
performance_schema = OFF
skip-name-resolve
EOF
echo "$PKGS" >"$P/.hop-paper-ready"
rm -rf "$R"
mv "$P" "$R"
echo "rootfs ready: $R ($(du -sh "$R" | cut -f1))"
