<?php

declare(strict_types=1);

namespace Swocloud;

/**
 * GatewayClient's static style over one shared {@see Client}: set the Route
 * once, then call the verbs from anywhere.
 *
 *     Gateway::$routeUrl = 'http://127.0.0.1:9500';   // GatewayClient: $registerAddress
 *     Gateway::$apiKey = getenv('SWOCLOUD_API_KEY') ?: null;
 *     Gateway::sendToUid('alice', ['text' => 'hi']);
 *
 * Each verb is {@see Client}'s, with the same arguments, answers and
 * exceptions; see there. The shared client is rebuilt when one of the
 * settings below changes.
 */
final class Gateway
{
    /** The Route's base URL (its admin address when it has `admin_listen`). */
    public static string $routeUrl = 'http://127.0.0.1:9500';

    /** The Route's `api_key`; null when it has none. */
    public static ?string $apiKey = null;

    /** Seconds allowed to connect, and for each read. */
    public static float $timeout = 5.0;

    private static ?Client $client = null;

    /** @var array{string, ?string, float}|null the settings $client was made with */
    private static ?array $madeWith = null;

    /**
     * The shared client, made from the current settings.
     *
     * @throws \InvalidArgumentException when {@see Gateway::$routeUrl} is not http(s)
     */
    public static function client(): Client
    {
        $settings = [self::$routeUrl, self::$apiKey, self::$timeout];
        if (self::$client === null || self::$madeWith !== $settings) {
            self::$client = new Client(self::$routeUrl, self::$apiKey, self::$timeout);
            self::$madeWith = $settings;
        }
        return self::$client;
    }

    /**
     * {@see Client::sendToUid()}: a stored message to every connection of a user (or of each of several).
     *
     * @param string|list<string> $uid
     *
     * @return array<string, mixed>
     *
     * @throws SwocloudException
     */
    public static function sendToUid(string|array $uid, mixed $data, ?string $from = null, ?string $ref = null): array
    {
        return self::client()->sendToUid($uid, $data, $from, $ref);
    }

    /**
     * {@see Client::sendToGroup()}: a message to every member of a group (or of each of several).
     *
     * @param string|list<string> $group
     *
     * @return array<string, mixed>
     *
     * @throws SwocloudException
     */
    public static function sendToGroup(string|array $group, mixed $data, ?string $from = null, ?string $ref = null): array
    {
        return self::client()->sendToGroup($group, $data, $from, $ref);
    }

    /**
     * {@see Client::joinGroup()}: makes a user a member of a group.
     *
     * @return array<string, mixed>
     *
     * @throws SwocloudException
     */
    public static function joinGroup(string $uid, string $group): array
    {
        return self::client()->joinGroup($uid, $group);
    }

    /**
     * {@see Client::leaveGroup()}: removes a user from a group.
     *
     * @return array<string, mixed>
     *
     * @throws SwocloudException
     */
    public static function leaveGroup(string $uid, string $group): array
    {
        return self::client()->leaveGroup($uid, $group);
    }

    /**
     * {@see Client::getClientCountByGroup()}: how many members are online.
     *
     * @throws SwocloudException
     */
    public static function getClientCountByGroup(string $group): int
    {
        return self::client()->getClientCountByGroup($group);
    }

    /**
     * {@see Client::getUidListByGroup()}: every member, all pages.
     *
     * @return list<string>
     *
     * @throws SwocloudException
     */
    public static function getUidListByGroup(string $group): array
    {
        return self::client()->getUidListByGroup($group);
    }

    /**
     * {@see Client::isUidOnline()}: whether a user has a connection open.
     *
     * @throws SwocloudException
     */
    public static function isUidOnline(string $uid): bool
    {
        return self::client()->isUidOnline($uid);
    }

    /**
     * {@see Client::closeUid()}: closes every connection of a user (code 4000, the reason).
     *
     * @return array<string, mixed>
     *
     * @throws SwocloudException
     */
    public static function closeUid(string $uid, ?string $reason = null): array
    {
        return self::client()->closeUid($uid, $reason);
    }
}
