<?php

declare(strict_types=1);

/*
 * A PSR-4 autoloader for the Swocloud\ namespace, for use without Composer:
 *
 *     require '/path/to/clients/php/autoload.php';
 *
 * With Composer, its own autoloader (vendor/autoload.php) does the same from
 * composer.json; do not load both.
 */

spl_autoload_register(static function (string $class): void {
    $prefix = 'Swocloud\\';
    if (strncmp($class, $prefix, strlen($prefix)) !== 0) {
        return;
    }
    $relative = substr($class, strlen($prefix));
    $file = __DIR__ . '/src/' . str_replace('\\', '/', $relative) . '.php';
    if (is_file($file)) {
        require $file;
    }
});
