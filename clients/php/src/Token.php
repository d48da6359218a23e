<?php

declare(strict_types=1);

namespace Swocloud;

/**
 * swocloud's one credential format: a JWT signed with HMAC-SHA256 (HS256)
 * under the cluster's `auth_secret`, with the claims `sub` (a user's uid, or
 * an IM server's serviceName), `aud` (`user` or `register`) and `exp` (Unix
 * seconds).
 *
 * A PHP backend mints user tokens for its logged-in users and hands them to
 * the browser or app, which asks `GET /route?uid=U&token=T` (see
 * {@see Client::routeFor()}) for its IM server.
 */
final class Token
{
    /** The audience of a user's token (`/route`, IM server connections). */
    public const USER = 'user';

    /** The audience of an IM server's registration token. */
    public const REGISTER = 'register';

    /**
     * Mints a token.
     *
     * @param string $secret the cluster's `auth_secret` (the Route's and the IM servers')
     * @param string $sub    the subject: a uid for `user`, a serviceName for `register`
     * @param string $aud    the audience: {@see Token::USER} or {@see Token::REGISTER}
     * @param int    $ttl    seconds from now until it expires
     *
     * @return string `header.claims.signature`, base64url without padding
     */
    public static function mint(string $secret, string $sub, string $aud = self::USER, int $ttl = 3600): string
    {
        $header = self::b64('{"alg":"HS256","typ":"JWT"}');
        $claims = self::b64(json_encode(
            ['sub' => $sub, 'aud' => $aud, 'exp' => time() + $ttl],
            JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR,
        ));
        $signature = self::b64(hash_hmac('sha256', "$header.$claims", $secret, true));
        return "$header.$claims.$signature";
    }

    /**
     * Mints a user's token: `mint($secret, $uid, 'user', $ttl)`.
     *
     * @param string $secret the cluster's `auth_secret`
     * @param string $uid    the user
     * @param int    $ttl    seconds from now until it expires
     */
    public static function user(string $secret, string $uid, int $ttl = 3600): string
    {
        return self::mint($secret, $uid, self::USER, $ttl);
    }

    /** base64url without padding (RFC 7515). */
    private static function b64(string $bytes): string
    {
        return rtrim(strtr(base64_encode($bytes), '+/', '-_'), '=');
    }
}
